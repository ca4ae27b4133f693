"""A Vim checkpoint's class-token layout comes from the checkpoint (a vimexp one's saved config, else `src_pool`, else
the released official layout), and pos_embed meets a new grid the correct way or the official way (front-token).
The modes are checked against float64 tensors built by hand: each source row is a one-hot vector of its index, and
bicubic resampling is the separable cubic-convolution matrix (a = -0.75, half-pixel centres, edges clamped), so every
expected row says which source rows went into it, with which weights."""
import argparse

import pytest
import torch

from vimexp import VimexpError
from vimexp.models import create_model, load_checkpoint
from vimexp.models.backbone import build_backbone
from vimexp.models.checkpoint import adapt_pos_embed, extract_state_dict, fit_vim_pos_embed

NANO = dict(depth=1, embed_dim=17, num_classes=10, kernel="torch")  # 4 x 4 grid at 32 px; width = 4 x 4 + 1 rows


def cubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): torch's bicubic resize along one axis (align_corners=False), written out."""
    a, scale = -0.75, n_in / n_out
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        x = (j + 0.5) * scale - 0.5
        i0 = int(torch.floor(torch.tensor(x)))
        t = x - i0
        for k, d in zip(range(i0 - 1, i0 + 3), (t + 1, t, 1 - t, 2 - t)):
            d = abs(d)
            c = ((a + 2) * d - (a + 3)) * d * d + 1 if d <= 1 else ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            w[j, min(max(k, 0), n_in - 1)] += c
    return w


def grid_matrix(side: int, out: int) -> torch.Tensor:
    """(out^2, side^2): bicubic resampling of a raster-order side x side grid to out x out."""
    m = cubic_matrix(side, out)
    return torch.kron(m, m)


def one_hot_rows(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)[None]  # row i of pos_embed is e_i: it names its own index


def expected(rows: int, width: int, placed: dict[int, torch.Tensor]) -> torch.Tensor:
    out = torch.zeros(1, rows, width, dtype=torch.float64)
    for r, v in placed.items():
        out[0, r] = v
    return out


def spread(weights: torch.Tensor, columns: list[int], width: int) -> torch.Tensor:
    """A row of `width` with `weights` at `columns` (the source rows the grid cells came from)."""
    row = torch.zeros(width, dtype=torch.float64)
    row[columns] = weights
    return row


# ----- the two modes against hand-built tensors: a 4 x 4 grid (class row 8 of 17) to 6 x 6 (class row 18 of 37)
W = grid_matrix(4, 6)
SRC_GRID = [i for i in range(17) if i != 8]  # the patch rows of a middle-token source, raster order


def test_correct_mode_keeps_the_middle_class_row_and_resamples_the_grid_alone():
    dst = create_model("vim_nano", img_size=48, pool="middle", **NANO)
    out = fit_vim_pos_embed(dst, one_hot_rows(17), "middle", "correct")
    rows = {18: torch.eye(17, dtype=torch.float64)[8]}
    rows.update({r: spread(W[r - (r > 18)], SRC_GRID, 17) for r in range(37) if r != 18})
    torch.testing.assert_close(out, expected(37, 17, rows), rtol=0, atol=1e-12)


def test_official_mode_takes_row_0_as_the_class_row_and_the_rest_as_the_grid():
    """main.py --finetune: row 0 (patch (0,0)) stays in front, rows 1..16 (the class row 8 among them) are the grid;
    the model's class slot 18 gets grid cell 17 of that."""
    dst = create_model("vim_nano", img_size=48, pool="middle", **NANO)
    out = fit_vim_pos_embed(dst, one_hot_rows(17), "middle", "official")
    rows = {0: torch.eye(17, dtype=torch.float64)[0]}
    rows.update({r: spread(W[r - 1], list(range(1, 17)), 17) for r in range(1, 37)})
    torch.testing.assert_close(out, expected(37, 17, rows), rtol=0, atol=1e-12)
    assert out[0, 18, 8] != 0  # the old class row leaks into the new class slot through the grid


@pytest.mark.parametrize("mode, columns", [("correct", SRC_GRID), ("official", list(range(1, 17)))])
def test_dense_backbone_drops_the_class_row_or_slices_the_front_one(mode, columns):
    """A backbone without class token: correct drops row 8; official is the dense loaders' pos_embed[:, 1:] after the
    front-token resampling, so patch (0,0)'s row goes and the class row stays as a grid cell."""
    dst = create_model("vim_nano", img_size=48, dense=True, **NANO)
    assert dst.num_cls_tokens == 0
    out = fit_vim_pos_embed(dst, one_hot_rows(17), "middle", mode)
    torch.testing.assert_close(out, expected(36, 17, {r: spread(W[r], columns, 17) for r in range(36)}),
                               rtol=0, atol=1e-12)


def test_official_mode_at_the_stride_8_fine_tune_sizes():
    """Vim-Ti 14 x 14 + middle class row 98 -> stride 8, 27 x 27 + class slot 364, as ft-vim-t.sh loads it."""
    dst = create_model("vim_ti_stride8", depth=1, kernel="torch")
    pe = torch.randn(1, 197, 192, dtype=torch.float64)
    out = fit_vim_pos_embed(dst, pe, "middle", "official")
    grid = (grid_matrix(14, 27) @ pe[0, 1:])[None]
    torch.testing.assert_close(out, torch.cat([pe[:, :1], grid], 1), rtol=0, atol=1e-12)
    correct = fit_vim_pos_embed(dst, pe, "middle", "correct")
    torch.testing.assert_close(correct[:, 364], pe[:, 98], rtol=0, atol=0)
    torch.testing.assert_close(correct[:, :364], (grid_matrix(14, 27) @ pe[0, [i for i in range(197) if i != 98]]
                                                  )[None, :364], rtol=0, atol=1e-12)


def test_same_grid_same_layout_is_identity_in_both_modes():
    dst = create_model("vim_nano", pool="middle", **NANO)
    pe = one_hot_rows(17)
    for mode in ("correct", "official"):
        assert torch.equal(fit_vim_pos_embed(dst, pe, "middle", mode), pe)
    with pytest.raises(VimexpError, match="unknown pos_embed mode 'front'"):
        fit_vim_pos_embed(dst, pe, "middle", "front")


# ----- the layout comes from the checkpoint
def official_file(path, pool="middle", **kwargs):
    torch.manual_seed(0)
    model = create_model("vim_nano", pool=pool, **{**NANO, **kwargs})
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="vim")}, path)
    return model


def vimexp_file(path, pool, **kwargs):
    torch.manual_seed(1)
    model = create_model("vim_nano", pool=pool, **{**NANO, **kwargs})
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "vimexp_config": {"model": {"name": "vim_nano", "pool": pool}}}, path)
    return model


def assert_loaded(model, source):
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_an_official_middle_checkpoint_into_a_head_model_is_an_error(tmp_path):
    official_file(tmp_path / "vim.pth")
    with pytest.raises(VimexpError, match=r"laid out as pool='middle', the model's as pool='head': build the model "
                                          r"with pool=middle.*src_pool"):
        load_checkpoint(create_model("vim_nano", pool="head", **NANO), tmp_path / "vim.pth")


def test_an_official_head_file_loads_when_its_layout_is_given(tmp_path):
    source = official_file(tmp_path / "head.pth", pool="head")
    assert_loaded(load_checkpoint(create_model("vim_nano", pool="head", **NANO), tmp_path / "head.pth",
                                  src_pool="head"), source)
    with pytest.raises(VimexpError, match="src_pool='double' has 2 class token"):
        load_checkpoint(create_model("vim_nano", pool="head", **NANO), tmp_path / "head.pth", src_pool="double")


def test_an_official_middle_checkpoint_into_a_dense_backbone_drops_row_8(tmp_path):
    source = official_file(tmp_path / "vim.pth")
    dense = load_checkpoint(create_model("vim_nano", dense=True, **NANO), tmp_path / "vim.pth", ignore=("head.",))
    torch.testing.assert_close(dense.pos_embed, torch.cat([source.pos_embed[:, :8], source.pos_embed[:, 9:]], 1),
                               rtol=0, atol=0)
    assert not hasattr(dense, "cls_token")


def test_a_vimexp_head_checkpoint_into_a_dense_backbone_drops_row_0(tmp_path):
    source = vimexp_file(tmp_path / "head.ckpt", "head")
    dense = load_checkpoint(create_model("vim_nano", dense=True, **NANO), tmp_path / "head.ckpt", ignore=("head.",))
    torch.testing.assert_close(dense.pos_embed, source.pos_embed[:, 1:], rtol=0, atol=0)
    with pytest.raises(VimexpError, match=r"src_pool='middle' was asked.*pool='head' \(by its saved config\)"):
        load_checkpoint(create_model("vim_nano", dense=True, **NANO), tmp_path / "head.ckpt", ignore=("head.",),
                        src_pool="middle")


@pytest.mark.parametrize("pool", ["head", "middle", "double", "mean"])
def test_a_vimexp_checkpoint_into_its_own_layout_is_identity(pool, tmp_path):
    source = vimexp_file(tmp_path / "run.ckpt", pool)
    assert_loaded(load_checkpoint(create_model("vim_nano", pool=pool, **NANO), tmp_path / "run.ckpt"), source)


def test_the_layout_travels_with_the_weights_into_adapt_pos_embed(tmp_path):
    """vimexp.eval fits extract_state_dict's weights with adapt_pos_embed: a head-token run into a wider grid keeps
    its class row at 0."""
    source = vimexp_file(tmp_path / "head.ckpt", "head")
    sd = extract_state_dict(torch.load(tmp_path / "head.ckpt", weights_only=True))
    assert sd.pool == "head"
    out = adapt_pos_embed(create_model("vim_nano", pool="head", img_size=48, **NANO), sd)
    torch.testing.assert_close(out["pos_embed"][:, 0], source.pos_embed[:, 0], rtol=0, atol=0)


def test_the_model_config_chooses_the_mode(tmp_path):
    source = official_file(tmp_path / "vim.pth")
    cfg = dict(name="vim_nano", img_size=48, init_from=str(tmp_path / "vim.pth"), **NANO)
    official = build_backbone({**cfg, "init_pos_embed": "official"})
    correct = build_backbone({**cfg, "init_pos_embed": "correct"})
    torch.testing.assert_close(official.pos_embed[:, 0], source.pos_embed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(correct.pos_embed[:, 18], source.pos_embed[:, 8], rtol=0, atol=0)
    with pytest.raises(VimexpError, match="pool='middle', the model's as pool='head'"):
        build_backbone({**cfg, "pool": "head"})
    head = official_file(tmp_path / "head.pth", pool="head")
    loaded = build_backbone({**cfg, "img_size": 32, "pool": "head", "init_from": str(tmp_path / "head.pth"),
                             "init_src_pool": "head"})
    assert_loaded(loaded, head)
