"""The DDP benchmark's weight bookkeeping (python -m vimexp.bench bench=ddp): the weights it takes as a run's start are
the ones train() starts from, inside the benchmark's own Hydra job too, and its gaps measure what they say."""
import torch

from conftest import TINY_RUN, data_overrides, run_cli
from vimexp.bench.ddp import initial_weights, model_weights, train_overrides_arg, weight_gap


def test_initial_weights_are_where_training_starts(tiny_data, tmp_path):
    # lr 0 and no weight decay: AdamW leaves the weights where they started, so last.ckpt holds the start
    overrides = [*data_overrides(tiny_data), *TINY_RUN, "logger=csv", "trainer.accelerator=cpu",
                 "trainer.max_epochs=1", "optimizer.lr=0", "optimizer.weight_decay=0",
                 "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1"]
    run = run_cli("train", *overrides, "seed=3", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    trained, step = model_weights(tmp_path / "run")
    start = initial_weights(overrides, seed=3)
    assert step == 2 and trained.keys() == start.keys()
    assert all(torch.equal(trained[k], start[k]) for k in start)
    other_seed = initial_weights(overrides, seed=4)
    assert weight_gap(trained, other_seed)["rel_to_weights"] > 0.1
    from hydra import initialize_config_dir

    from vimexp.cli import CONF_DIR
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # as inside `python -m vimexp.bench bench=ddp`
        in_job = initial_weights(overrides, seed=3)
    assert all(torch.equal(in_job[k], start[k]) for k in start)


def test_train_overrides_travel_as_one_hydra_list():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    arg = train_overrides_arg(["data.root=/x/y", "trainer.max_epochs=1"])
    parsed = OverridesParser.create().parse_overrides([arg.strip('"')])[0]
    assert parsed.key_or_group == "bench.train_overrides" and parsed.value() == ["data.root=/x/y",
                                                                                  "trainer.max_epochs=1"]


def test_weight_gap_relative_to_weights_and_to_the_update():
    init = {"w": torch.zeros(4, dtype=torch.float64)}
    a = {"w": torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)}  # moved 5 from init
    b = {"w": torch.tensor([3.0, 4.0, 0.0, 0.5], dtype=torch.float64)}
    gap = weight_gap(a, b, init)
    assert gap == {"rel_to_weights": 0.1, "max_abs": 0.5, "worst_tensor_rel": 0.1, "rel_to_update": 0.1}


def test_runs_train_on_the_builtin_data_or_on_photo_jpegs_made_once(tmp_path):
    import pytest
    from omegaconf import OmegaConf

    from vimexp import VimexpError
    from vimexp.bench import compose_train
    from vimexp.bench.ddp import base_overrides
    photo = {"root": str(tmp_path / "jpegs"), "classes": 2, "train_per_class": 4, "val_per_class": 1, "width": 40,
             "height": 30}
    bench = OmegaConf.create({"data": "builtin", "photo": photo, "kernel": "fused", "workers": 3})
    assert "data=builtin" in base_overrides(bench) and "model.kernel=fused" in base_overrides(bench)
    bench.data = "photo"
    overrides = base_overrides(bench)
    assert len(list((tmp_path / "jpegs" / "train").glob("*/*.JPEG"))) == 8
    cfg = compose_train([*overrides, "paths.output_dir=."])
    assert (cfg.data.root, cfg.data.num_classes, cfg.data.num_workers) == (str(tmp_path / "jpegs"), 2, 3)
    assert cfg.data.auto_augment.startswith("rand-m9")  # DeiT's pipeline: conf/data/imagenet.yaml
    bench.data = "imagenet"
    with pytest.raises(VimexpError, match="bench.data='imagenet': choose builtin or photo"):
        base_overrides(bench)
