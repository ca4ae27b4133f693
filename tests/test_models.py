"""Registry, checkpoints (official and vimexp formats, pos-embed adaptation), baselines and the shared interface."""
import pytest
import torch
from timm.optim import param_groups_layer_decay

from vimexp import VimexpError
from vimexp.models import create_model, list_models, load_checkpoint
from vimexp.models.backbone import num_layers

SMALL = dict(img_size=32, patch_size=8, stride=8, depth=4, embed_dim=32, num_classes=10, kernel="torch")


def test_registry_names_and_unknown_name():
    for name in ("vim_ti", "vim_s", "vim_b", "vim_ti_stride8", "vim_s_stride8", "vim_b_stride8", "deit_ti", "deit_s",
                 "deit_b"):
        assert name in list_models()
    with pytest.raises(VimexpError, match="unknown model 'vim_xl'.*vim_ti"):
        create_model("vim_xl")


def test_forcing_cuda_without_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(VimexpError, match="kernel='cuda' can't run: torch sees no CUDA GPU"):
        create_model("vim_ti", kernel="cuda")
    assert create_model("vim_nano", kernel="auto").kernel == "torch"


def test_stride8_geometry():
    m = create_model("vim_ti_stride8", kernel="torch")
    assert m.patch_embed.grid_size == (27, 27) and m.pos_embed.shape == (1, 730, 192) and m.cls_positions() == [364]


def _official_file(tmp_path, model, ema=None):
    path = tmp_path / "official.pth"
    import argparse
    torch.save({"model": model.state_dict(), "model_ema": (ema or model).state_dict(), "epoch": 299,
                "args": argparse.Namespace(model="vim_tiny")}, path)
    return path


@pytest.mark.parametrize("stride", [16, 8])  # patches that tile the image (one GEMM), overlapping ones (the conv)
def test_patch_embedding_is_the_convolution(stride):
    """The patch embedding against torch's conv2d in float64, forward and the weight's gradient."""
    from vimexp.models.vim import PatchEmbed
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=48, patch_size=16, stride=stride, embed_dim=8).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(x, embed.proj.weight, embed.proj.bias, stride=stride).flatten(2).transpose(1, 2)
    out = embed(x)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    grads = [torch.autograd.grad((y * g).sum(), embed.proj.weight, retain_graph=True)[0] for y in (out, ref)]
    assert torch.allclose(*grads, rtol=0, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as autocast's conv: bf16 inputs and weights
        half = embed.float()(x.float())
    assert half.dtype == torch.bfloat16 and torch.allclose(half.double(), ref, rtol=0.02, atol=0.05)


def test_official_checkpoint_loads_raw_and_ema(tmp_path):
    src, ema = create_model("vim_nano", **SMALL), create_model("vim_nano", **SMALL)
    path = _official_file(tmp_path, src, ema)
    raw = load_checkpoint(create_model("vim_nano", **SMALL), path)
    averaged = load_checkpoint(create_model("vim_nano", **SMALL), path, use_ema=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(raw.eval()(x), src.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(averaged.eval()(x), ema.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("pool", ["middle", "head", "double", "mean"])
def test_pos_embed_resampling_keeps_class_tokens_in_place(pool, tmp_path):
    src = create_model("vim_nano", **{**SMALL, "pool": pool})  # 4x4 grid
    path = _official_file(tmp_path, src)
    dst = load_checkpoint(create_model("vim_nano", **{**SMALL, "pool": pool, "img_size": 64}), path,  # 8x8 grid
                          src_pool=pool)  # an official-format file is middle-token unless told otherwise
    assert dst.pos_embed.shape[1] == 64 + dst.num_cls_tokens
    for s, d in zip(src.cls_positions(), dst.cls_positions()):  # class-token rows moved, unchanged
        torch.testing.assert_close(dst.pos_embed[0, d], src.pos_embed[0, s])
    # the grid rows are a bicubic upsampling of the source grid: same mean, corners close to the source corners
    keep = [i for i in range(dst.pos_embed.shape[1]) if i not in dst.cls_positions()]
    src_keep = [i for i in range(src.pos_embed.shape[1]) if i not in src.cls_positions()]
    assert torch.allclose(dst.pos_embed[0, keep].mean(0), src.pos_embed[0, src_keep].mean(0), atol=5e-3)


def test_vim_s_from_224_checkpoint_runs_at_448(tmp_path):
    """The README's recipe: build vim_s at 448 px, load a 224 px checkpoint, run."""
    path = _official_file(tmp_path, create_model("vim_s", kernel="torch", depth=2))
    model = load_checkpoint(create_model("vim_s", img_size=448, kernel="torch", depth=2), path).eval()
    assert model.pos_embed.shape == (1, 28 * 28 + 1, 384) and model.cls_positions() == [392]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 448, 448)).shape == (1, 1000)


def test_mismatched_checkpoint_names_the_key_and_shapes(tmp_path):
    path = _official_file(tmp_path, create_model("vim_nano", **SMALL))
    with pytest.raises(VimexpError, match=r"'cls_token' is \[1, 1, 32\] in the checkpoint but \[1, 1, 64\] in the model"):
        load_checkpoint(create_model("vim_nano", **{**SMALL, "embed_dim": 64}), path)
    with pytest.raises(VimexpError, match="key 'layers.0.mixer.A_b_log' is missing"):
        load_checkpoint(create_model("vim_nano", **SMALL), _official_file(
            tmp_path, create_model("vim_nano", **{**SMALL, "bidirectional": "none"})))
    (tmp_path / "broken.pth").write_bytes(b"\x00" * 10)
    with pytest.raises(VimexpError, match="can't be read"):
        load_checkpoint(create_model("vim_nano", **SMALL), tmp_path / "broken.pth")


def test_deit_attention_switch_changes_kernel_not_numbers():
    torch.manual_seed(0)
    eager = create_model("deit_ti", attn="eager", img_size=64, depth=2).eval()
    fused = create_model("deit_ti", attn="sdpa", img_size=64, depth=2).eval()
    fused.load_state_dict(eager.state_dict())
    assert not eager.blocks[0].attn.fused_attn and fused.blocks[0].attn.fused_attn
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["vim_nano", "deit_nano"])
def test_shared_interface(name):
    model = create_model(name, num_classes=10)
    assert "pos_embed" in model.no_weight_decay()
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.5)
    scales = {round(g["lr_scale"], 6) for g in groups}
    depth = num_layers(model)
    assert len(scales) == depth + 2  # embeddings, one per block, then norm + head
    x, indices = torch.randn(2, 3, 32, 32), [1, depth - 1]
    maps = model.forward_intermediates(x, indices=indices, intermediates_only=True)  # timm's signature, both
    grid = 32 // model.patch_embed.proj.kernel_size[0]
    assert [tuple(m.shape) for m in maps] == [(2, model.embed_dim, grid, grid)] * 2


def test_vim_layer_ids_follow_the_official_det_mapping():
    model = create_model("vim_nano", num_classes=10)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g["lr_scale"] for g in groups for n in g["param_names"]} if "param_names" in groups[0] else None
    if by_name is None:
        pytest.skip("this timm does not report parameter names per group")
    assert by_name["pos_embed"] == pytest.approx(0.5 ** 7)
    assert by_name["layers.0.mixer.in_proj.weight"] == pytest.approx(0.5 ** 6)
    assert by_name["head.weight"] == pytest.approx(1.0)


@pytest.mark.parametrize("bidirectional", ["none", "sequence", "block", "ssm", "ssm_conv"])
@pytest.mark.parametrize("pool", ["mean", "max", "head", "double", "middle"])
def test_every_ablation_variant_trains(bidirectional, pool):
    model = create_model("vim_nano", **{**SMALL, "bidirectional": bidirectional, "pool": pool}).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_deit_randaugment_runs_on_current_pillow():
    """'rand-m9-mstd0.5-inc1' samples Posterize down to 0 bits: a black image, not a Pillow error."""
    from PIL import Image
    from timm.data.auto_augment import NAME_TO_OP

    import vimexp.data.imagefolder  # noqa: F401  (applies the fix)
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert NAME_TO_OP["PosterizeIncreasing"](img, 0).getextrema() == ((0, 0),) * 3
    assert NAME_TO_OP["PosterizeIncreasing"](img, 4).getpixel((0, 0)) == (192, 96, 48)


def test_timm_creates_the_vims_by_its_names():
    import timm
    assert set(timm.list_models("vim*")) >= {"vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224"}
    torch.manual_seed(0)
    via_timm = timm.create_model("vim_small_patch16_224", num_classes=10, depth=2, img_size=64, kernel="torch")
    torch.manual_seed(0)
    ours = create_model("vim_s", num_classes=10, depth=2, img_size=64, kernel="torch")
    assert via_timm.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(via_timm.state_dict().values(), ours.state_dict().values()))
    with pytest.raises(VimexpError, match="has no released weights"):  # the others: tests/test_pretrained.py
        timm.create_model("vim_base_patch16_stride8_224", pretrained=True, depth=2)
