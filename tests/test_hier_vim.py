"""Hier-Vim (Appendix C) and its Swin baselines: stage shapes, Table 6's parameter counts, a global bidirectional
token mixer where Swin has local windows."""
import pytest
import torch

from vimexp.models import create_model

TABLE6_PARAMS_M = {"hier_vim_t": 30, "hier_vim_s": 50, "hier_vim_b": 89}
SWIN_PARAMS_M = {"swin_t": 28.3, "swin_s": 49.6, "swin_b": 87.8}  # Swin paper / timm


@pytest.mark.parametrize("name", sorted(TABLE6_PARAMS_M))
def test_parameter_counts_are_within_5_percent_of_table_6(name):
    params = sum(p.numel() for p in create_model(name, kernel="torch").parameters()) / 1e6
    assert abs(params / TABLE6_PARAMS_M[name] - 1) < 0.05, params


@pytest.mark.parametrize("name", sorted(SWIN_PARAMS_M))
def test_swin_baselines_are_the_published_models(name):
    params = sum(p.numel() for p in create_model(name).parameters()) / 1e6
    assert params == pytest.approx(SWIN_PARAMS_M[name], abs=0.1)


def test_every_stage_halves_the_map_and_doubles_the_width():
    model = create_model("hier_vim_t", kernel="torch", img_size=128, num_classes=7).eval()
    x = model.patch_embed(torch.randn(2, 3, 128, 128))
    shapes = []
    for stage in model.stages:
        x = stage(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(2, 32, 32, 96), (2, 16, 16, 192), (2, 8, 8, 384), (2, 4, 4, 768)]
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 7)


def _reach(mixer, hw, corner) -> torch.Tensor:
    """Which tokens of a (height, width) map a token mixer's output changes at when the token at `corner` changes,
    in float64 (Vim's init makes the SSM's long-range part small, far below float32's resolution of the map)."""
    h, w = hw
    mixer = mixer.double()
    torch.manual_seed(0)
    x = torch.randn(1, h, w, mixer.dim, dtype=torch.float64)
    y = x.clone()
    y[0, corner[0], corner[1]] += torch.randn(mixer.dim, dtype=torch.float64)
    with torch.no_grad():
        return (mixer(y) - mixer(x)).abs().amax(-1)[0] > 1e-13


class _FlatMixer(torch.nn.Module):  # Hier-Vim's mixer as its stage applies it: the map flattened row by row
    def __init__(self, mixer, dim):
        super().__init__()
        self.mixer, self.dim = mixer, dim

    def forward(self, x):
        return self.mixer(x.reshape(1, -1, self.dim)).view(x.shape)


class _WindowAttention(torch.nn.Module):  # Swin's first block minus its MLP: norm, 7 x 7 window attention, no shift
    def __init__(self, block, dim):
        super().__init__()
        self.block, self.dim = block, dim

    def forward(self, x):
        return self.block._attn(self.block.norm1(x))


def test_the_ssm_mixes_the_whole_stage_in_both_directions_where_swin_mixes_a_window():
    torch.manual_seed(0)  # the weights, not whatever tests ran before, decide how far the scan's memory reaches
    hier = create_model("hier_vim_t", kernel="torch", img_size=224).eval()
    swin = create_model("swin_t", img_size=224).eval()
    ssm = _FlatMixer(hier.stages[0].blocks[0].mixer, 96)
    window = _WindowAttention(swin.layers[0].blocks[0], 96)
    for corner in [(0, 0), (55, 55)]:  # first and last token of the 56 x 56 stage: forward and backward scan
        assert _reach(ssm, (56, 56), corner).all()
        assert _reach(window, (56, 56), corner).sum() == 49
