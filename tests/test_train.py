"""The framework through its real configs and CLI: every experiment runs, runs leave a full record, resume is exact."""
import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY_RUN, compose_cfg, data_overrides, det_data_overrides, run_cli, seg_data_overrides
from vimexp.curves import panels, read_metrics
from vimexp.models import create_model
from vimexp.cli import CONF_DIR
from vimexp.train import train

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


SEGMENTATION = [e for e in EXPERIMENTS if e.startswith(("ade20k", "builtin_seg"))]
DETECTION = [e for e in EXPERIMENTS if e.startswith(("coco", "builtin_det"))]


@pytest.mark.parametrize("experiment", SEGMENTATION)
def test_every_segmentation_experiment_composes_and_runs_a_step(experiment, tiny_seg_data, tmp_path):
    tiny = ["++model.depth=4", "++model.embed_dim=48", "task.channels=32", "task.slide_stride=32"]
    tiny.append("task.out_indices=[3]" if "segmenter" in experiment else "task.out_indices=[0,1,2,3]")
    cfg = compose_cfg([f"experiment={experiment}", "debug=fdr", *seg_data_overrides(tiny_seg_data),
                       "data.num_classes=10", "data.batch_size=4", "data.num_workers=0", *tiny], tmp_path)
    record = train(cfg)
    assert record["task"] == "segmentation" and "val/mIoU" in record["final"]
    assert list((tmp_path / "previews").glob("val_step*.png"))  # in the run directory, whatever the loggers


@pytest.mark.parametrize("experiment", DETECTION)
def test_every_detection_experiment_composes_and_runs_a_step(experiment, tiny_det_data, tmp_path):
    tiny = ["++model.depth=2", "++model.embed_dim=24", "task.channels=16", "task.fc_dim=32",
            "task.anchor_sizes=[8,16,32,64,128]", "task.roi_per_image=32"]
    if "deit" in experiment:  # ViTDet's windows and global blocks on an 8x8 grid of 8 px patches
        tiny = [*tiny, "++model.patch_size=8", "++model.window_size=4", "++model.num_heads=3",
                "++model.global_attn_indexes=[1]"]
    cfg = compose_cfg([f"experiment={experiment}", "debug=fdr", *det_data_overrides(tiny_det_data),
                       "data.batch_size=2", "data.num_workers=0", "trainer.precision=32", *tiny], tmp_path)
    record = train(cfg)
    assert record["task"] == "detection" and "val/box_AP" in record["final"] and "val/mask_AP" in record["final"]
    assert list((tmp_path / "previews").glob("val_step*.png"))


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e not in SEGMENTATION + DETECTION])
def test_every_experiment_composes_and_runs_a_step(experiment, tiny_data, tmp_path):
    tiny_model = ["++model.depth=2", "++model.embed_dim=48"]
    if "swin" in experiment or "hier_vim" in experiment:  # 4 stages; width 24 splits over Swin's 3/6/12/24 heads
        tiny_model = ["++model.depths=[1,1,1,1]", "++model.embed_dim=24"]
    if "_ft_" in experiment:  # fine-tuning starts from the stride-16 weights of the same tiny model
        name = "vim_nano" if experiment.startswith("builtin") else experiment.split("_")[1] + "_" + experiment.split("_")[2]
        source = create_model(name, depth=2, embed_dim=48, img_size=32, num_classes=10, kernel="torch")
        torch.save({"model": source.state_dict()}, tmp_path / "init.pth")
        tiny_model.append(f"model.init_from={tmp_path / 'init.pth'}")
    cfg = compose_cfg([f"experiment={experiment}", "debug=fdr", *data_overrides(tiny_data), "data.num_classes=10",
                       "data.img_size=32", "data.batch_size=4", "data.num_workers=0", *tiny_model], tmp_path)
    record = train(cfg)
    assert record["experiment"] == experiment
    assert record["model"] == cfg.model.name
    assert (tmp_path / "results.json").is_file()


def test_paper_recipe_is_in_the_experiment(tmp_path):
    cfg = compose_cfg(["experiment=imagenet_vim_ti", "data.root=/imagenet"], tmp_path)
    assert cfg.data.batch_size == 1024 and cfg.optimizer.lr * cfg.data.batch_size / 512 == pytest.approx(1e-3)
    assert (cfg.optimizer.weight_decay, cfg.model.drop_path_rate, cfg.trainer.max_epochs) == (0.1, 0.0, 300)
    assert cfg.data.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.re_prob == 0.25 and cfg.data.repeated_aug
    assert (cfg.task.mixup, cfg.task.cutmix, cfg.task.smoothing, cfg.task.ema_decay) == (0.8, 1.0, 0.1, 0.99996)
    assert (cfg.scheduler.warmup_epochs, cfg.scheduler.warmup_lr, cfg.scheduler.min_lr) == (5, 1e-6, 1e-5)
    assert cfg.trainer.precision == "32-true" and cfg.data.crop_pct == 0.875


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning")  # resumed elsewhere on purpose
def test_resume_continues_exactly(tiny_data, tmp_path):
    common = ["logger=csv", *data_overrides(tiny_data), *TINY_RUN, "++trainer.limit_val_batches=1",
              "scheduler.epochs=2", "task.mixup=0.8", "task.cutmix=1.0", "++model.drop_path_rate=0.1",
              "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25"]
    train(compose_cfg([*common, "trainer.max_epochs=2"], tmp_path / "straight"))
    train(compose_cfg([*common, "trainer.max_epochs=1"], tmp_path / "first"))
    resumed = compose_cfg([*common, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"],
                          tmp_path / "resumed")
    record = train(resumed)
    straight, again = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == again.keys() and any(k.startswith("ema.") for k in straight)
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=0, msg=key)
    assert record["epochs"] == 2  # history carried over from the first half
    straight_results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert record["final"] == straight_results["final"]


def test_ckpt_path_last_resumes_the_newest_run_this_command_started(tiny_data, tmp_path):
    """ckpt_path=last takes the newest run of its run_name started with the same overrides (trainer.max_epochs aside:
    raising it extends a finished run), never a newer run of other overrides; with none, it refuses in one line
    naming the newest one's resume command; a run already as long as asked is left as it is."""
    common = ["debug=limit", *data_overrides(tiny_data), *TINY_RUN, "run_name=resumable"]
    runs = tmp_path / "logs" / "debug" / "resumable"
    first = run_cli("train", *common, "trainer.max_epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    first_dir = next(runs.iterdir())
    other = run_cli("train", *common, "trainer.max_epochs=1", "seed=1", cwd=tmp_path)  # newer, another seed
    assert other.returncode == 0, other.stderr[-3000:]
    other_dir = next(d for d in runs.iterdir() if d != first_dir)
    other_results = (other_dir / "results.json").read_bytes()
    again = run_cli("train", *common, "trainer.max_epochs=2", "ckpt_path=last", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {first_dir / 'checkpoints' / 'last.ckpt'}" in again.stdout
    assert sorted(runs.iterdir()) == sorted([first_dir, other_dir])  # no directory left by the resuming job
    results = json.loads((first_dir / "results.json").read_text())  # its best score, metrics, results.json go on
    assert results["epochs"] == 2 and torch.load(first_dir / "checkpoints" / "last.ckpt",
                                                 weights_only=False)["epoch"] == 1
    assert (other_dir / "results.json").read_bytes() == other_results
    written = (first_dir / "results.json").read_bytes()
    done = run_cli("train", *common, "trainer.max_epochs=2", "ckpt_path=last", cwd=tmp_path)
    assert done.returncode == 0 and "already finished" in done.stdout, done.stderr[-3000:]
    assert (first_dir / "results.json").read_bytes() == written
    refused = run_cli("train", *common, "trainer.max_epochs=2", "seed=2", "ckpt_path=last", cwd=tmp_path)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ckpt_path=last: no run of run_name=resumable") and \
        f"the newest, {first_dir}, was started with others: resume it with: python" in line, line  # the one resumed
    assert line.endswith(f"trainer.max_epochs=2 hydra.run.dir={first_dir}") and " seed=" not in line
    assert sorted(runs.iterdir()) == sorted([first_dir, other_dir])


def test_cli_run_leaves_a_complete_record_and_eval_reproduces_it(tiny_data, tmp_path):
    run = run_cli("train", "debug=limit", "logger=default", *data_overrides(tiny_data), *TINY_RUN,
                  "run_name=cli_test", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = next((tmp_path / "logs" / "debug" / "cli_test").iterdir())
    assert run.stdout.strip().splitlines()[-1].startswith("results in ")  # the last line: no W&B summary after it
    for noise in ("Tip:", "eval mode", "Trainable params", "TPU", "Run summary", "anonymous", "LeafSpec"):
        assert noise not in run.stdout + run.stderr, noise  # Lightning's and W&B's
    assert re.search(r"train/loss=\d", run.stdout)  # the bar shows the loss (logged without Lightning's prog_bar)
    assert f"results in {run_dir.resolve()} (results.json, curves.png, checkpoints/, metrics.csv)" in run.stdout
    with Image.open(run_dir / "curves.png") as curves:  # loss, lr, top-1 raw and EMA: three 500 x 380 px panels
        curves.verify()
        assert curves.format == "PNG" and curves.size == (1500, 380)
    drawn = dict(panels(read_metrics(run_dir / "metrics.csv"), "val/acc1"))  # the real run's columns, as named
    assert drawn["learning rate"] == ["train/lr"] and drawn["val/acc1 (%)"] == ["val/acc1", "val_ema/acc1"]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("final", "best", "params", "train_img_per_sec", "overrides", "git_commit", "experiment", "wandb_run_id"):
        assert key in results, key
    assert set(results["final"]) == {"val/acc1", "val/acc5", "val_ema/acc1", "val_ema/acc5"}
    assert results["experiment"] == "builtin" and results["epochs"] == 2 and results["wandb_run_id"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "metrics.csv").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"

    ev = run_cli("eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *data_overrides(tiny_data),
                 *TINY_RUN, "++trainer.limit_val_batches=2", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    eval_dir = next((tmp_path / "logs" / "eval").glob("*/*"))
    evaluated = json.loads((eval_dir / "results.json").read_text())
    for key in ("val/acc1", "val_ema/acc1"):  # same weights, same val batches -> same top-1
        assert evaluated["final"][key] == pytest.approx(results["final"][key], abs=1e-6), key


def test_eval_takes_the_model_and_data_from_the_checkpoint(tiny_data, tmp_path):
    """A checkpoint carries its run's resolved config: eval needs only the checkpoint (and what should differ)."""
    run = run_cli("train", "debug=limit", "logger=csv", *data_overrides(tiny_data), "++model.depth=3",
                  "++model.embed_dim=24", "data.batch_size=16", "data.num_workers=0", "run_name=ckpt_cfg", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = next((tmp_path / "logs" / "debug" / "ckpt_cfg").iterdir())
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["vimexp_config"]["model"]["depth"] == 3 and ckpt["vimexp_config"]["data"]["root"] == str(tiny_data)
    ev = run_cli("eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "++trainer.limit_val_batches=2",
                 "data.num_workers=0", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    evaluated = json.loads(next((tmp_path / "logs" / "eval").rglob("results.json")).read_text())
    trained = json.loads((run_dir / "results.json").read_text())
    assert evaluated["params"] == trained["params"]  # the 3-layer width-24 model, not the default vim_nano
    assert evaluated["final"]["val/acc1"] == pytest.approx(trained["final"]["val/acc1"], abs=1e-6)


def test_gradient_accumulation_scales_the_lr_by_the_images_of_a_step(tiny_data, tmp_path):
    """lr x (data.batch_size x trainer.accumulate_grad_batches) / 512, as the batch of an optimizer step is."""
    run = run_cli("train", "debug=limit", *data_overrides(tiny_data), *TINY_RUN, "trainer.accumulate_grad_batches=2",
                  "run_name=accum", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = next((tmp_path / "logs" / "debug" / "accum").iterdir())
    lrs = [float(r["train/lr"]) for r in csv.DictReader(open(run_dir / "metrics.csv")) if r.get("train/lr")]
    assert lrs and lrs[0] == pytest.approx(8e-3 * 16 * 2 / 512)  # experiment=builtin's lr, batch 16, 2 accumulated
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # 3 batches an epoch (debug=limit): steps after the 2nd and the 3rd, 2 epochs


def test_wandb_gets_the_whole_run_config(tiny_data, tmp_path, monkeypatch):
    import wandb
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(["debug=limit", "logger=default", *data_overrides(tiny_data), *TINY_RUN], tmp_path)
    train(cfg)
    try:
        logged = dict(wandb.run.config)
        assert logged["data"]["batch_size"] == 16 and logged["seed"] == 0 and logged["trainer"]["max_epochs"] == 2
        assert logged["model"]["depth"] == 2  # and the task's own arguments, as before
    finally:
        wandb.finish()


def test_training_images_per_second_leave_out_the_epochs_validation():
    """img/s counts the epoch's training batches after the first, up to the last one's end: what runs after it (the
    validation, the checkpoints) is not training time."""
    import time
    from types import SimpleNamespace

    from vimexp.tasks.bookkeeping import RunBookkeeping

    class Task(RunBookkeeping):
        trainer = SimpleNamespace(num_training_batches=4, world_size=2)
        logged = {}

        def log(self, name, value):
            self.logged[name] = value

    task, batch = Task(), (torch.zeros(8, 3), None)
    task.on_train_epoch_start()
    ends = []  # (before, after) each batch's end hook: the clock reads somewhere inside them
    for i in range(4):
        time.sleep(0.05)
        before = time.perf_counter()
        task.on_train_batch_end(None, batch, i)
        ends.append((before, time.perf_counter()))
    time.sleep(0.5)  # the validation
    task.on_train_epoch_end()
    assert task.logged["train/img_per_sec"] == task.img_per_sec
    longest, shortest = ends[3][1] - ends[0][0], ends[3][0] - ends[0][1]
    assert 3 * 8 * 2 / longest <= task.img_per_sec <= 3 * 8 * 2 / shortest  # 24 images a process, 2 processes


def test_a_resumed_run_counts_the_wall_time_of_every_part(monkeypatch):
    """RunBookkeeping's wall time: a part's seconds in fit travel in its checkpoints and the next part adds its own
    (results.json's wall_seconds), on a clock the test sets."""
    from vimexp.tasks import bookkeeping
    clock = [100.0]
    monkeypatch.setattr(bookkeeping.time, "time", lambda: clock[0])
    first = bookkeeping.RunBookkeeping()
    first.history = []
    first.on_fit_start()
    clock[0] = 130.0
    checkpoint = {}
    first.on_save_checkpoint(checkpoint)
    assert checkpoint["wall_seconds"] == 30.0
    clock[0] = 500.0  # the job waited in the queue: not the run's time
    second = bookkeeping.RunBookkeeping()
    second.on_load_checkpoint(checkpoint)
    second.on_fit_start()
    clock[0] = 520.0
    assert second.wall_seconds() == 50.0
