"""RoPE (docs/official_impl.md §1.10) against an independent float64 reference written from the spec text: the
tables (2-D frequencies squeezed onto the 14-grid), the rotation and its odd-length rule, and whole tiny Vims, logits
and gradients, whose naive layer loop (the mixer and RMSNorm of test_vim_reference.py) applies the reference RoPE
where the official code does: before every layer to the hidden states and, from the second on, to the residual."""
import pytest
import torch

from conftest import compose_cfg
from test_vim_reference import _perturb_, _tsv_expanded, naive_mixer, naive_rms
from vimexp import VimexpError
from vimexp.models import create_model, load_checkpoint
from vimexp.models.backbone import build_backbone
from vimexp.models.vim import Rope
from vimexp.ops import backend
from vimexp.ops.norm import scaled

TOL = 1e-12  # float64 end to end: largest |ours - reference| relative to the reference's largest |value|


# ----- the reference, from the spec text only

def ref_tables(D, rows, cols=None, pt=14, theta=10000.0):
    """cos, sin (rows*cols, D): dim = D/2, f_k = theta^(-2k/dim) for k < dim/2, positions t_i = i*pt/side; per axis
    the angles t_i*f_k, each twice in a row (width D/2); cell (r, c) = [row angles of r, column angles of c]."""
    cols = cols or rows
    dim = D // 2
    f = [theta ** (-2 * k / dim) for k in range(dim // 2)]

    def axis(side):
        return [[i * pt / side * fk for fk in f for _ in (0, 1)] for i in range(side)]

    r_ang, c_ang = axis(rows), axis(cols)
    angles = torch.tensor([r_ang[r] + c_ang[c] for r in range(rows) for c in range(cols)], dtype=torch.float64)
    return angles.cos(), angles.sin()


def ref_rotate(x, cos, sin):
    """x*cos + rotate_half(x)*sin, rotate_half as a matrix: channel 2j <- -channel 2j+1, 2j+1 <- channel 2j."""
    D = x.shape[-1]
    R = torch.zeros(D, D, dtype=torch.float64)
    for j in range(D // 2):
        R[2 * j, 2 * j + 1], R[2 * j + 1, 2 * j] = -1.0, 1.0
    return x * cos + (x @ R.T) * sin


def ref_rope(x, cos, sin):
    """The official application: an odd-length sequence leaves token 0 alone and rotates the others."""
    if x.shape[1] % 2:
        return torch.cat([x[:, :1], ref_rotate(x[:, 1:], cos, sin)], 1)
    return ref_rotate(x, cos, sin)


def ref_rope_ends(x, cos, sin):
    """vimexp's rule where the official one has none (pool='double'): both class tokens at the ends left alone."""
    return torch.cat([x[:, :1], ref_rotate(x[:, 1:-1], cos, sin), x[:, -1:]], 1)


def naive_vim(P, img, depth, stride, pool, rope=None, rope_residual=False, variant="v2", paired=False, flip=False):
    """VisionMamba (docs/official_impl.md §1.4, §2, §1.10) in float64 from its parameters P. `rope`: the reference
    rotation, before every layer (pair) on the hidden states and, with rope_residual, on the residual once it exists,
    in patch order (the 'sequence' flip undone around it). Returns (logits, {layer k: the residual stream layer k+1
    computes, as the official use_residual_as_feature; the last layer: residual + hidden})."""
    x = torch.nn.functional.conv2d(img, P["patch_embed.proj.weight"], P["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    B, M, _ = x.shape
    if pool == "middle":
        x = torch.cat([x[:, :M // 2], P["cls_token"].expand(B, -1, -1), x[:, M // 2:]], 1)
    elif pool == "head":
        x = torch.cat([P["cls_token"].expand(B, -1, -1), x], 1)
    elif pool == "double":
        x = torch.cat([P["cls_token_head"].expand(B, -1, -1), x, P["cls_token_tail"].expand(B, -1, -1)], 1)
    x = x + P["pos_embed"]
    orient = (lambda t: t.flip(1)) if flip else (lambda t: t)
    turn = (lambda t: orient(rope(orient(t)))) if rope else None
    hidden, residual, feats = orient(x), None, {}

    def block(i, h, r):
        r = h if r is None else r + h
        feats[i - 1] = orient(r)
        mixer = {k[len(f"layers.{i}.mixer."):]: v for k, v in P.items() if k.startswith(f"layers.{i}.mixer.")}
        return naive_mixer(mixer, naive_rms(r, P[f"layers.{i}.norm.weight"]), variant, True, casts=True), r

    for i in range(0, depth, 2 if paired else 1):
        if turn:
            hidden = turn(hidden)
            residual = turn(residual) if rope_residual and residual is not None else residual
        if paired:
            h_f, r_f = block(i, hidden, residual)
            h_b, r_b = block(i + 1, hidden.flip(1), None if residual is None else residual.flip(1))
            hidden, residual = h_f + h_b.flip(1), r_f + r_b.flip(1)
        else:
            hidden, residual = block(i, hidden, residual)
    feats[depth - 1] = orient(residual + hidden)
    out = orient(naive_rms(residual + hidden, P["norm_f.weight"]))
    feat = {"middle": out[:, M // 2], "head": out[:, 0], "double": (out[:, 0] + out[:, -1]) / 2, "mean": out.mean(1),
            "max": out}[pool]
    logits = feat @ P["head.weight"].T + P["head.bias"]
    return (logits.amax(1) if pool == "max" else logits), feats


# ----- helpers

def max_rel(ours, ref) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref))


def rms_norm_f64(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                 x_scale=None):
    """The torch path's add + RMSNorm without its float32 casts (the official kernels' precision), so that a float64
    model stays float64 and differences far below float32 resolution show."""
    x = scaled(x, x_scale)
    s = x if residual is None else x + residual
    out = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * weight
    return (out, s) if prenorm else out


@pytest.fixture
def float64_norm(monkeypatch):
    monkeypatch.setattr(backend("torch").ops, "rms_norm", rms_norm_f64)


def tiny(img=64, patch=8, **kw):
    """A float64 Vim with every parameter perturbed (forward and backward branches distinct)."""
    torch.manual_seed(0)
    kw = {"img_size": img, "patch_size": patch, "stride": patch, "depth": 2, "embed_dim": 16, "num_classes": 7,
          "kernel": "torch", "rope": True, "rope_residual": True, **kw}
    model = create_model("vim_nano", **kw).double().eval()
    _perturb_(model, seed=1)
    return model


def compare(model, rope, variant="v2", paired=False, flip=False):
    """(logits error, gradient error) of the model against naive_vim with `rope`, one backward of a random loss."""
    img, stride = model.patch_embed.img_size[0], model.patch_embed.proj.stride[0]
    x = torch.randn(2, 3, img, img, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    P = dict(model.named_parameters())
    leaves = [x, *P.values()]
    ours = model(x)
    ref, _ = naive_vim(P, x, len(model.layers), stride, model.pool, rope, model.rope_residual, variant, paired, flip)
    w = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g_ours = torch.autograd.grad((ours * w).sum(), leaves)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    return max_rel([ours], [ref]), max_rel(g_ours, g_ref)


# ----- the tables and the rotation

@pytest.mark.parametrize("side", [14, 8, 32, 64])  # the 224 px grid, and squeezed onto it: 128, 512, 1024 px
def test_tables_match_the_spec(side):
    rope = Rope(192, (side, side)).double()
    cos, sin = ref_tables(192, side)
    assert rope.freqs_cos.shape == (side * side, 192)
    assert max_rel([rope.freqs_cos, rope.freqs_sin], [cos, sin]) <= 1e-14


def test_pretraining_grid_positions_are_the_patch_indices():
    """At 14 x 14 the squeeze is the identity: channel 0 turns by the row index, channel D/2 by the column."""
    rope = Rope(192, (14, 14)).double()
    r, c = torch.arange(14.0, dtype=torch.float64).repeat_interleave(14), torch.arange(14.0).repeat(14).double()
    torch.testing.assert_close(rope.freqs_cos[:, 0], r.cos(), rtol=0, atol=1e-14)
    torch.testing.assert_close(rope.freqs_sin[:, 96], c.sin(), rtol=0, atol=1e-14)


def test_float32_tables_are_the_rounded_float64_ones():
    rope, cos, _ = Rope(384, (32, 32)), *ref_tables(384, 32)
    assert rope.freqs_cos.dtype == torch.float32
    torch.testing.assert_close(rope.freqs_cos, cos.float(), rtol=0, atol=6e-8)  # at most an ulp from a pow ulp
    torch.testing.assert_close(rope.double().freqs_cos, cos, rtol=0, atol=1e-14)  # not the float32 values widened


@pytest.mark.parametrize("extra", [0, 1])  # dense (even: every token) and head/middle class token (odd: token 0 kept)
def test_rotation_matches_the_spec(extra):
    rope, (cos, sin) = Rope(32, (6, 6)).double(), ref_tables(32, 6)
    x = torch.randn(3, 36 + extra, 32, dtype=torch.float64)
    out = rope(x)
    assert max_rel([out], [ref_rope(x, cos, sin)]) <= 1e-14
    if extra:
        assert torch.equal(out[:, 0], x[:, 0])
    pairs = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731  a rotation of each channel pair
    torch.testing.assert_close(pairs(out), pairs(x), rtol=1e-14, atol=0)


def test_rotation_of_two_class_tokens_leaves_both_ends():
    rope, (cos, sin) = Rope(16, (4, 4)).double(), ref_tables(16, 4)
    x = torch.randn(2, 18, 16, dtype=torch.float64)
    assert max_rel([rope(x)], [ref_rope_ends(x, cos, sin)]) <= 1e-14


def test_a_sequence_the_table_does_not_fit_is_refused():
    with pytest.raises(VimexpError, match="16 grid cells, the sequence 20 tokens"):
        Rope(16, (4, 4))(torch.randn(1, 20, 16))


def test_bad_options_are_refused():
    with pytest.raises(VimexpError, match="rope_residual=True .* needs rope=True"):
        create_model("vim_nano", rope_residual=True)
    with pytest.raises(VimexpError, match="multiple of 4, got 18"):
        create_model("vim_nano", rope=True, embed_dim=18)


# ----- whole models against the naive loop, float64

@pytest.mark.parametrize("pool", ["middle", "head", "mean", "max"])
@pytest.mark.parametrize("rope_residual", [True, False])
def test_model_matches_the_reference(pool, rope_residual, float64_norm):
    """8 x 8 grid (squeezed onto 14); middle and head: 65 tokens, the odd-length rule."""
    model = tiny(pool=pool, rope_residual=rope_residual)
    cos, sin = ref_tables(16, 8)
    e_logits, e_grads = compare(model, lambda t: ref_rope(t, cos, sin))
    assert e_logits <= TOL and e_grads <= TOL, (e_logits, e_grads)


def test_two_class_tokens(float64_norm):
    model = tiny(pool="double")
    cos, sin = ref_tables(16, 8)
    e_logits, e_grads = compare(model, lambda t: ref_rope_ends(t, cos, sin))
    assert e_logits <= TOL and e_grads <= TOL, (e_logits, e_grads)


def test_paired_blocks_turn_once_per_pair(float64_norm):
    model = tiny(bidirectional="block", depth=4, pool="mean")
    cos, sin = ref_tables(16, 8)
    e_logits, e_grads = compare(model, lambda t: ref_rope(t, cos, sin), variant="none", paired=True)
    assert e_logits <= TOL and e_grads <= TOL, (e_logits, e_grads)


def test_flipped_sequence_turns_in_patch_order(float64_norm):
    model = tiny(bidirectional="sequence", flip_prob=1.0, pool="middle").train()  # always flipped
    cos, sin = ref_tables(16, 8)
    e_logits, e_grads = compare(model, lambda t: ref_rope(t, cos, sin), variant="none", flip=True)
    assert e_logits <= TOL and e_grads <= TOL, (e_logits, e_grads)


@pytest.mark.parametrize("pool", ["mean", "middle"])
def test_odd_grid_and_stride(pool, float64_norm):
    """5 x 5 = 25 cells (patch 8, stride 4 at 24 px), which the official code can't turn: all cells are turned,
    a class token at the front left alone."""
    model = tiny(img=24, patch=8, stride=4, pool=pool)
    cos, sin = ref_tables(16, 5)

    def turn(t):  # 26 tokens with the class token
        return torch.cat([t[:, :1], ref_rotate(t[:, 1:], cos, sin)], 1) if t.shape[1] == 26 else ref_rotate(t, cos, sin)

    e_logits, e_grads = compare(model, turn)
    assert e_logits <= TOL and e_grads <= TOL, (e_logits, e_grads)


def test_rope_off_matches_the_reference_without_rope(float64_norm):
    e_logits, e_grads = compare(tiny(rope=False, rope_residual=False), None)
    assert e_logits <= TOL and e_grads <= TOL, (e_logits, e_grads)


def test_rope_changes_the_output():
    on, off = tiny(), tiny(rope=False, rope_residual=False)
    off.load_state_dict(on.state_dict())
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert (on(x) - off(x)).abs().max() > 1e-3


# ----- dense backbones (no class token, other resolutions) and forward_intermediates

def test_dense_backbone_intermediates_match_the_reference(float64_norm):
    """Segmentation at 48 px / 8 px patches: a 6 x 6 grid squeezed onto 14; the maps after layers 0-2 are the
    residual stream as the next layer computes it (turned), after the last one residual + hidden."""
    torch.manual_seed(0)
    model = create_model("vim_nano", dense=True, img_size=48, depth=4, embed_dim=16, num_classes=0, kernel="torch",
                         rope=True, rope_residual=True).double().eval()
    _perturb_(model, seed=1)
    assert model.pool == "mean" and model.pos_embed.shape[1] == 36
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    maps = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    P = {**dict(model.named_parameters()), "head.weight": torch.zeros(1, 16, dtype=torch.float64),
         "head.bias": torch.zeros(1, dtype=torch.float64)}
    cos, sin = ref_tables(16, 6)
    _, feats = naive_vim(P, x, 4, 8, "mean", lambda t: ref_rope(t, cos, sin), True)
    ref = [feats[k].transpose(1, 2).reshape(2, 16, 6, 6) for k in range(4)]
    assert max_rel(maps, ref) <= TOL


def test_checkpoint_of_a_rope_classifier_loads_into_a_larger_dense_backbone(tmp_path):
    """The tables are not in the state dict: a 4 x 4 classifier's weights load at 8 x 8 (pos_embed resampled)."""
    src = create_model("vim_nano", kernel="torch", rope=True, rope_residual=True, pool="mean")
    torch.save({"model": src.state_dict()}, tmp_path / "rope.pth")
    dense = create_model("vim_nano", dense=True, img_size=64, num_classes=0, kernel="torch", rope=True,
                         rope_residual=True)
    load_checkpoint(dense, tmp_path / "rope.pth", ignore=("head.",))
    assert dense.rope.freqs_cos.shape == (64, 48)
    torch.testing.assert_close(dense.rope.freqs_cos, Rope(48, (8, 8)).freqs_cos, rtol=0, atol=0)


def test_an_official_rope_checkpoint_loads_without_its_tables(tmp_path):
    """The official RoPE models also saved rope.freqs_cos/sin: skipped (model.init_ignore=[rope.]), recomputed."""
    src = create_model("vim_nano", kernel="torch", rope=True, rope_residual=True, pool="mean").eval()
    sd = {**src.state_dict(), "rope.freqs_cos": src.rope.freqs_cos, "rope.freqs_sin": src.rope.freqs_sin}
    torch.save({"model": sd}, tmp_path / "official.pth")
    dst = create_model("vim_nano", kernel="torch", rope=True, rope_residual=True, pool="mean").eval()
    load_checkpoint(dst, tmp_path / "official.pth", ignore=("rope.",))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(dst(x), src(x))


# ----- the official layout, and the configs

@pytest.mark.parametrize("rope", [False, True])
def test_state_dict_keeps_the_official_layout(rope):
    model = create_model("vim_ti", kernel="torch", rope=rope, rope_residual=rope)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _tsv_expanded()
    assert (model.rope is None) != rope


def test_rope_options_from_the_configs(tmp_path):
    for experiment, name in [("imagenet_vim_ti_rope", "vim_ti"), ("imagenet_vim_s_rope", "vim_s"),
                             ("ade20k_upernet_vim_s", "vim_s"), ("coco_cascade_vim_ti", "vim_ti")]:
        cfg = compose_cfg([f"experiment={experiment}", "data.root=/x"], tmp_path)
        assert (cfg.model.name, cfg.model.rope, cfg.model.rope_residual) == (name, True, True), experiment
        assert cfg.model.pool == "mean" or not experiment.startswith("imagenet"), experiment  # no class token
    for experiment in ["imagenet_vim_ti", "imagenet_vim_s", "ade20k_upernet_vim_ti"]:
        assert not compose_cfg([f"experiment={experiment}", "data.root=/x"], tmp_path).model.rope, experiment
    assert "rope" not in compose_cfg(["experiment=ade20k_upernet_deit_s", "data.root=/x"], tmp_path).model
    cfg = compose_cfg(["experiment=builtin", "model.rope=true", "data.root=/x"], tmp_path)
    net = build_backbone({**cfg.model, "img_size": 32, "num_classes": 10})
    assert net.rope is not None and not net.rope_residual
