"""kernel="fused" (vimexp.ops.fused_mixer) against the plain PyTorch mixer in float64, at tiny sizes with blocks
smaller than the sequence (several chunks, a ragged last one). On a CPU the Triton kernels run in Triton's
interpreter; on a GPU natively. The comparison with mamba-ssm at Vim's real shapes is in tests/test_gpu.py."""
import copy

import pytest
import torch

pytest.importorskip("triton")

from vimexp import VimexpError  # noqa: E402
from vimexp.models import create_model  # noqa: E402
from vimexp.models.vim import VimMixer  # noqa: E402
from vimexp.ops import fused_mixer  # noqa: E402

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 (Triton's CPU interpreter) before torch loaded.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # float32 kernels against a float64 reference


@pytest.fixture
def small_blocks(monkeypatch):
    for table, values in ((fused_mixer.SCAN_BWD, dict(T=8, BD=2)), (fused_mixer.CONV_BLOCK, dict(BE=8, BT=16)),
                          (fused_mixer.SEQ, dict(BD=8, CL=5))):
        for key, value in values.items():
            monkeypatch.setitem(table, key, value)


def _mixers(seed=0, d_model=8):
    torch.manual_seed(seed)
    ref = VimMixer(d_model, kernel="torch").double()
    with torch.no_grad():  # away from the init's symmetries: every parameter perturbed
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(ref).float().to(DEVICE)
    fused.kernel = "fused"
    return ref, fused


def rel(a, b) -> float:
    return ((a.detach().double().cpu() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch, length, d_model", [(2, 19, 8), (1, 3, 6)])
def test_training_path_matches_float64_reference(small_blocks, batch, length, d_model):
    ref, fused = _mixers(d_model=d_model)
    x = torch.randn(batch, length, d_model, dtype=torch.float64, requires_grad=True)
    xf = x.detach().float().to(DEVICE).requires_grad_()
    g = torch.randn(batch, length, d_model, dtype=torch.float64)
    y = ref(x)
    (y * g).sum().backward()
    out = fused(xf)
    (out * g.float().to(DEVICE)).sum().backward()
    errors = {"out": rel(out, y), "x": rel(xf.grad, x.grad),
              **{n: rel(q.grad, p.grad) for (n, p), q in zip(ref.named_parameters(), fused.parameters())}}
    assert len(errors) == 2 + len(list(ref.parameters()))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("chunk", [5, 64])  # several chunks carried into each other, and one
@pytest.mark.parametrize("batch, length, d_model", [(3, 19, 8), (1, 2, 6)])  # 12 channels: partly filled blocks
def test_inference_path_matches_float64_reference(small_blocks, monkeypatch, chunk, batch, length, d_model):
    monkeypatch.setitem(fused_mixer.SEQ, "CL", chunk)
    ref, fused = _mixers(seed=1, d_model=d_model)
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    with torch.no_grad():
        assert rel(fused(x.float().to(DEVICE)), ref(x)) <= TOL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_fused_without_gpu_says_why():
    with pytest.raises(VimexpError, match="kernel='fused' can't run: torch sees no CUDA GPU"):
        create_model("vim_nano", kernel="fused")


@pytest.mark.parametrize("capability, expected", [((9, 0), "fused_inference"), ((8, 0), "cuda")])
def test_auto_runs_the_triton_mixer_on_hopper_only(monkeypatch, capability, expected):
    """The policy behind kernel=auto: the fused inference kernels where they were measured faster (sm_90)."""
    import vimexp.ops as ops
    monkeypatch.setattr(ops, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    assert ops.resolve_kernel("auto") == expected
    assert ops.resolve_kernel("fused") == "fused"


def test_fused_on_an_old_gpu_says_why(monkeypatch):
    import vimexp.ops as ops
    monkeypatch.setattr(ops, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))
    with pytest.raises(VimexpError, match=r"kernel='fused_inference' can't run: its Triton kernels need compute"):
        ops.resolve_kernel("fused_inference")


def test_state_size_the_kernels_cannot_tile():
    with pytest.raises(VimexpError, match="power-of-two d_state, not 12"):
        VimMixer(8, d_state=12, kernel="fused")
    assert VimMixer(8, d_state=12, kernel="fused_inference").kernel == "cuda"  # auto's choice falls back quietly
