"""Built-in synthetic dataset: scene model, ImageFolder writer and its on-disk cache."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from conftest import TINY_RUN, run_cli
from vimexp.data import synthetic
from vimexp.data.synthetic import CLASSES, ensure_imagefolder, make_scene, write_imagefolder

SMALL = dict(train_per_class=3, val_per_class=2, size=32)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = _files(write_imagefolder(tmp_path / "a", seed=0, **SMALL))
    b = _files(write_imagefolder(tmp_path / "b", seed=0, **SMALL))
    c = _files(write_imagefolder(tmp_path / "c", seed=1, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    jpgs = [k for k in a if k.suffix == ".jpg"]
    assert all(a[k] != c[k] for k in jpgs)
    # train and val use different random streams: same class and index, different image
    first = Path(CLASSES[0]) / "00000.jpg"
    assert a["train" / first] != a["val" / first]


def test_layout_is_readable_by_torchvision_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "ds", **SMALL)
    assert json.loads((root / "vimexp_dataset.json").read_text())["classes"] == list(CLASSES)
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(CLASSES)
        ds = ImageFolder(root / split)
        assert ds.classes == list(CLASSES)
        assert ds.class_to_idx == {c: i for i, c in enumerate(CLASSES)}
        assert np.bincount(ds.targets).tolist() == [n] * len(CLASSES)
        img, _ = ds[0]
        assert img.size == (32, 32) and img.mode == "RGB"


def test_ensure_reuses_complete_dataset_and_regenerates_on_change(tmp_path, capsys):
    root = tmp_path / "ds"
    ensure_imagefolder(root, **SMALL)
    assert "generating" in capsys.readouterr().out
    before = _mtimes(root)

    assert ensure_imagefolder(root, **SMALL) == root
    assert capsys.readouterr().out == ""
    assert _mtimes(root) == before  # nothing rewritten

    ensure_imagefolder(root, **{**SMALL, "train_per_class": 4})
    assert "generating" in capsys.readouterr().out
    assert len(list((root / "train" / CLASSES[0]).iterdir())) == 4
    with pytest.raises(TypeError):
        ensure_imagefolder(root, bogus=1)


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ds"
    real, calls = synthetic.make_scene, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "make_scene", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_imagefolder(root, **SMALL)
    assert not root.exists()
    monkeypatch.setattr(synthetic, "make_scene", real)

    # A leftover temp dir (e.g. the process was killed) and a root without metadata are not datasets.
    stale = tmp_path / ".ds.tmp-999999"
    (stale / "train" / CLASSES[0]).mkdir(parents=True)
    (root / "train").mkdir(parents=True)
    capsys.readouterr()
    ensure_imagefolder(root, **SMALL)
    assert "generating" in capsys.readouterr().out
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert len(ImageFolder(root / "val")) == 2 * len(CLASSES)


def test_a_training_run_that_generates_its_data_shows_a_bar_with_the_eta_on_stderr(tmp_path):
    params = "{train_per_class:2,val_per_class:1,size:32,seed:0}"
    run = run_cli("train", "debug=fdr", f"data.root={tmp_path / 'shapes'}", f"data.generate_params={params}",
                  *TINY_RUN, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vimexp: generating built-in dataset" in run.stdout and "results in" in run.stdout  # its lines as before
    assert re.search(r"vimexp: writing images: +0%\|.*\| 0/30 \[00:00<\?", run.stderr)  # no estimate before an image
    assert re.search(r"vimexp: writing images: 100%\|.*\| 30/30 \[\d\d:\d\d<00:00, [\d.]+img/s\]", run.stderr)


@pytest.mark.parametrize("size,max_distractors", [(32, 0), (96, 4)])
def test_scene_objects_masks_bboxes_and_semantic_map(size, max_distractors):
    n_objects = 0
    for label in range(len(CLASSES)):
        for i in range(5):
            s = make_scene(np.random.default_rng([label, i]), size, label=label, max_distractors=max_distractors)
            assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
            assert s.label == s.objects[0].label == label
            n_objects += len(s.objects)
            for obj in s.objects:
                assert obj.mask.shape == (size, size) and obj.mask.dtype == bool and obj.mask.any()
                ys, xs = np.nonzero(obj.mask)
                # tight, pixel-edge xyxy box: the mask lies in [x0, x1) x [y0, y1)
                assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            sem = s.semantic_map()
            assert sem.shape == (size, size) and 0 <= sem.min() and sem.max() <= len(CLASSES)
            assert (sem[s.objects[0].mask] == label + 1).all()
            union = np.logical_or.reduce([o.mask for o in s.objects])
            assert ((sem > 0) == union).all()
    if max_distractors:
        assert n_objects > 2 * 50  # distractors do get placed


def test_colour_is_independent_of_class():
    # Mean main-object colour per class should be close to the global mean: colour carries no label.
    means = []
    for label in range(len(CLASSES)):
        cols = []
        for i in range(40):
            s = make_scene(np.random.default_rng([7, label, i]), 32, label=label)
            cols.append(s.image[s.objects[0].mask].mean(0))
        means.append(np.mean(cols, 0))
    assert np.ptp(np.array(means), axis=0).max() < 60
