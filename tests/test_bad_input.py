"""Bad input gets one clear line on stderr (exit status 2) before training, and no results.json."""
import shutil

import pytest

from conftest import TINY_RUN, data_overrides, run_cli


def _check_one_line_error(run, *fragments):
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _no_results(tmp_path):
    """No results.json, and no run directory at all (nor W&B run in it): the run failed before it saved anything."""
    assert not list(tmp_path.glob("logs/**/results.json"))
    assert not list(tmp_path.glob("logs/*/*/*")), sorted(map(str, tmp_path.glob("logs/*/*/*")))


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_data, root)
    return root


def test_missing_data_root(tmp_path):
    run = run_cli("train", "data=imagenet", f"data.root={tmp_path / 'nowhere'}", cwd=tmp_path)
    _check_one_line_error(run, "does not exist", "data.root=")
    _no_results(tmp_path)


def test_empty_data_root(tmp_path):
    (tmp_path / "empty").mkdir()
    run = run_cli("train", "data=imagenet", f"data.root={tmp_path / 'empty'}", cwd=tmp_path)
    _check_one_line_error(run, "has no train/ folder")


def test_val_classes_differ(data_copy, tmp_path):
    shutil.rmtree(data_copy / "val" / "star")
    run = run_cli("train", *data_overrides(data_copy), "data.generate=false", *TINY_RUN, cwd=tmp_path)
    _check_one_line_error(run, "different classes", "'star'")
    _no_results(tmp_path)


def test_unreadable_image(data_copy, tmp_path):
    bad = next((data_copy / "train" / "ring").glob("*.jpg"))
    bad.write_bytes(b"not a jpeg")
    run = run_cli("train", *data_overrides(data_copy), "data.generate=false", *TINY_RUN, "logger=csv",
                  "data.num_workers=1", cwd=tmp_path)
    _check_one_line_error(run, "can't read image", bad.name)
    _no_results(tmp_path)


@pytest.mark.parametrize("arg, fragment", [("experiment=imagenet_vim_xl", "unknown experiment 'imagenet_vim_xl'"),
                                           ("model=vim_huge", "unknown model 'vim_huge'")])
def test_unknown_config_name(arg, fragment, tmp_path):
    _check_one_line_error(run_cli("train", arg, cwd=tmp_path), fragment, "choose one of")


def test_checkpoint_of_another_model(tiny_data, tmp_path):
    first = run_cli("train", "debug=limit", *data_overrides(tiny_data), *TINY_RUN, "run_name=a", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = next(tmp_path.glob("logs/debug/a/*/checkpoints/last.ckpt"))
    run = run_cli("train", "debug=limit", *data_overrides(tiny_data), *TINY_RUN, "++model.embed_dim=48",
                  f"ckpt_path={ckpt}", "run_name=b", cwd=tmp_path)
    _check_one_line_error(run, "does not fit the model", "[")
    assert not list(tmp_path.glob("logs/debug/b/*"))  # no run directory: it failed before it saved anything
