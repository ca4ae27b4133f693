"""Released weights by name: timm's and vimexp's create_model load an official-format checkpoint (hustvl/Vim's main.py
layout) from a file or, offline, from the Hugging Face cache; a missing file is one line saying where it was looked for.
Nothing here reaches the network: in-process tests forbid the download, the cache test runs with HF_HUB_OFFLINE=1."""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from vimexp import VimexpError
from vimexp.models import checkpoint, create_model

TSV = Path(__file__).parent / "data" / "vim_tiny_state_dict.tsv"  # the official Vim-Ti keys and shapes, one layer
TINY = dict(depth=2, kernel="torch")  # Vim-Ti, 2 of its 24 layers: every official key kind, at CPU speed
OFFICIAL_TI = "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2"
REPO, FILE, FT_FILE = "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", "vim_t_midclstok_ft_78p3acc.pth"


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried the Hugging Face hub: {args}")
    monkeypatch.setattr(checkpoint, "hf_hub_download", refuse)


def official_checkpoint(path: Path) -> torch.nn.Module:
    """Write a main.py checkpoint of a 2-layer Vim-Ti: official keys, `model` beside a different `model_ema`, the
    pickled argparse.Namespace; returns the model whose weights are `model`."""
    torch.manual_seed(0)
    model, ema = create_model("vim_ti", **TINY).eval(), create_model("vim_ti", **TINY)
    official = {line.split("\t")[0]: line.split("\t")[1] for line in TSV.read_text().splitlines()}
    ours = {k.replace("layers.1.", "layers.0."): str(list(v.shape)) for k, v in model.state_dict().items()}
    assert ours == official  # the official key layout, shapes included
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "optimizer": {}, "lr_scheduler": {},
                "epoch": 299, "scaler": {}, "args": argparse.Namespace(model=OFFICIAL_TI)}, path)
    return model


def assert_same(loaded: dict, source: torch.nn.Module, skip: tuple[str, ...] = ()):
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith(skip)}
    assert {k for k in loaded if not k.startswith(skip)} == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_timm_loads_an_official_file_by_name(tmp_path):
    source = official_checkpoint(tmp_path / "vim_t.pth")
    x = torch.randn(1, 3, 224, 224)
    for name in ("vim_tiny_patch16_224", OFFICIAL_TI):  # the canonical name and its official alias
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "vim_t.pth")),
                                  **TINY).eval()
        assert_same(model.state_dict(), source)  # `model`, not `model_ema`
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
        assert model.pretrained_cfg["hf_hub_filename"] == FILE


def test_vimexp_loads_a_file_and_drops_a_head_of_other_classes(tmp_path):
    source = official_checkpoint(tmp_path / "vim_t.pth")
    for name in ("vim_ti", OFFICIAL_TI):
        assert_same(create_model(name, pretrained=tmp_path / "vim_t.pth", **TINY).state_dict(), source)
    ten = create_model("vim_ti", pretrained=tmp_path / "vim_t.pth", num_classes=10, **TINY)
    assert_same(ten.state_dict(), source, skip=("head.",))
    assert ten.head.weight.shape == (10, 192)


def test_released_files_in_the_cfgs():
    cfg = timm.models.get_pretrained_cfg
    assert (cfg("vim_tiny_patch16_224").hf_hub_id, cfg("vim_tiny_patch16_224").hf_hub_filename) == (REPO, FILE)
    assert cfg("vim_tiny_patch16_stride8_224").hf_hub_filename == FT_FILE  # the "+" weights are the stride-8 ones
    assert cfg("vim_small_patch16_224").hf_hub_filename == "vim_s_midclstok_80p5acc.pth"
    assert cfg("vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2"
               ).hf_hub_id == "hustvl/Vim-base-midclstok"
    data = timm.data.resolve_data_config({}, model=timm.create_model("vim_tiny_patch16_224", **TINY))
    assert (data["crop_pct"], data["interpolation"], data["input_size"]) == (0.875, "bicubic", (3, 224, 224))


def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(VimexpError, match="vim_base_patch16_stride8_224 has no released weights: pass the file") as e:
        timm.create_model("vim_base_patch16_stride8_224", pretrained=True, **TINY)
    with pytest.raises(VimexpError, match=f"checkpoint {tmp_path / 'nope.pth'} does not exist") as f:
        timm.create_model("vim_tiny_patch16_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")), **TINY)
    assert "\n" not in str(e.value) + str(f.value)


CACHED = f"""
import sys, timm, torch, vimexp.models
from vimexp import VimexpError
out = dict(timm=timm.create_model("vim_tiny_patch16_224", pretrained=True, **{TINY}).state_dict(),
           vimexp=vimexp.models.create_model("vim_ti", pretrained=True, **{TINY}).state_dict())
torch.save(out, sys.argv[1])
try:  # the fine-tuned file is not in the cache
    timm.create_model("vim_tiny_patch16_stride8_224", pretrained=True, **{TINY})
except VimexpError as e:
    print(e)
"""


def test_weights_from_the_hugging_face_cache_offline(tmp_path):
    source = official_checkpoint(tmp_path / "vim_t.pth")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"  # huggingface_hub's cache layout
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copy(tmp_path / "vim_t.pth", repo_dir / "snapshots" / commit / FILE)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", CACHED, str(tmp_path / "out.pt")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    assert_same(loaded["timm"], source)
    assert_same(loaded["vimexp"], source)
    message = run.stdout.strip()
    assert "\n" not in message
    for part in (f"vim_tiny_patch16_stride8_224: {FT_FILE} of the Hugging Face repo {REPO}", f"({repo_dir})",
                 f"`hf download {REPO} {FT_FILE}`", "pretrained=<path>"):
        assert part in message, message
