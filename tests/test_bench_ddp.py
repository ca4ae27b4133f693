"""The DDP benchmark's weight bookkeeping (python -m vimexp.bench bench=ddp): the weights it takes as a run's start are
the ones train() starts from, inside the benchmark's own Hydra job too, and its gaps measure what they say; its
phases run end to end as gloo processes on the CPU."""
import json

import torch

from conftest import TINY_RUN, data_overrides, run_cli
from vimexp.bench.ddp import device_counts, initial_weights, model_weights, train_overrides_arg, weight_gap


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
    bench = OmegaConf.create({"data": "builtin", "photo": photo, "kernel": "fused", "workers": 3, "accelerator": "gpu"})
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
    bench.data, bench.accelerator = "builtin", "tpu"
    with pytest.raises(VimexpError, match="bench.accelerator='tpu': choose gpu or cpu"):
        base_overrides(bench)


def test_throughput_runs_on_one_device_the_powers_of_two_and_all():
    assert device_counts(8) == [1, 2, 4, 8] and device_counts(6) == [1, 2, 4, 6] and device_counts(1) == [1]


def test_ddp_bench_on_the_cpu_scales_and_resumes_a_run_whose_rank_was_killed(tiny_data, tmp_path):
    """bench=ddp as gloo processes (bench.accelerator=cpu): img/s on 1 and 2 processes, and kill -9 on rank 1 of a
    2-process run after its first step checkpoint: the run fails in one line within a minute, and the same command
    resumes it to the uninterrupted run's weights, bit for bit."""
    tiny = [*data_overrides(tiny_data), "++model.depth=2", "++model.embed_dim=32", "data.img_size=32",
            "trainer.precision=32-true"]
    record = tmp_path / "ddp.json"
    run = run_cli("bench", "bench=ddp", "bench.accelerator=cpu", "bench.devices=2", "bench.batch=8", "bench.epochs=2",
                  "bench.phases=[throughput,kill_rank]", "bench.workers=2", "bench.kernel=torch", "bench.checkpoint_every=2",
                  f"bench.work={tmp_path / 'work'}", f"bench.record={record}", train_overrides_arg(tiny).strip('"'),
                  cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(record.read_text())
    assert set(r["throughput"]["runs"]) == {"1_gpus", "2_gpus"} and r["throughput"]["scaling_efficiency"]["2_gpus"] > 0
    assert r["throughput"]["runs"]["2_gpus"]["world_size"] == 2
    k = r["kill_rank"]
    assert k["exit"] == 2 and k["last_line"].startswith("error: another process of this 2-process run ended ("), k
    assert k["failed_after_s"] < 60 and k["resumed"] and k["steps"][0] == k["steps"][1] and k["bitwise_equal"], k
    assert (tmp_path / "work" / "kill_run" / "killed.log").is_file()
