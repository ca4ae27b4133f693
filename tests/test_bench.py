"""The benchmark package in its CPU mode (python -m vimexp.bench bench=...): every configuration measured, results
written, OOM handling, every bench config wired to its tool, the mixer sweep's block sizes reaching the kernels as
arguments. No timing is asserted: only that the harness produces complete, well-formed records."""
import csv
import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, run_cli
from vimexp.bench import backbones as bench_mod
from vimexp.models.dense.necks import PyramidBackbone

CPU = ["device=cpu", "kernel=torch", "warmup=1", "repeats=2", "iters=1", "bench.batch_sizes=[2]",
       "bench.precisions=[fp32]"]


@pytest.mark.parametrize("name,res", [("fig1", "[32,64]"), ("fig3_4", "[64]"), ("train", "[32]")])
def test_bench_cli_on_cpu(name, res, tmp_path):
    models = "{vim:{name:vim_ti,depth:4},deit_eager:{name:deit_ti,attn:eager,depth:2}}"
    run = run_cli("bench", f"bench={name}", *CPU, f"bench.resolutions={res}", "~bench.models", f"+bench.models={models}",
                  "bench.baseline=vim", f"out_dir={tmp_path}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    n_res = res.count(",") + 1
    assert len(record["rows"]) == 2 * n_res
    for row in record["rows"]:
        assert row["status"] == "ok" and row["img_per_sec"] > 0 and row["ms_spread"][0] <= row["ms_per_batch"]
        assert row["mode"] == ("train" if name == "train" else "inference")
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch"] == torch.__version__
    assert record["protocol"]["repeats"] == 2
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * n_res
    assert "vim / deit_eager img/s" in (tmp_path / "ratios.md").read_text()
    assert len(list(tmp_path.glob("*.png"))) == 1  # one figure per (batch, precision)
    n = 2 * n_res  # the bar over the configurations on stderr, with the ETA; their lines on stdout as before
    assert re.search(rf"bench: 100%\|.*\| {n}/{n} \[\d\d:\d\d<00:00, ", run.stderr)
    assert sum(line.startswith(("vim ", "deit_eager ")) for line in run.stdout.splitlines()) == n


def test_pyramid_gives_strides_4_to_32():
    for name in ("vim_ti", "deit_ti"):
        extra = {"kernel": "torch"} if name.startswith("vim") else {}
        model = PyramidBackbone(bench_mod.create_model(name, img_size=64, depth=4, **extra), out_indices=(0, 1, 2, 3))
        maps = model(torch.randn(1, 3, 64, 64))
        assert [m.shape[-1] for m in maps] == [16, 8, 4, 2] and all(m.shape[1] == 192 for m in maps)


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(monkeypatch):
    cfg = OmegaConf.create({"kernel": "torch", "warmup": 1, "repeats": 1, "iters": 1,
                            "bench": {"mode": "inference", "neck": False}})
    spec = {"name": "deit_ti", "depth": 1}

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    with monkeypatch.context() as m:
        m.setattr(bench_mod, "seconds_per_call", out_of_memory)
        row = bench_mod.measure("deit", spec, 32, 2, "fp32", cfg, torch.device("cpu"))
    assert row["status"] == "OOM" and "img_per_sec" not in row
    row = bench_mod.measure("deit", spec, 32, 2, "fp32", cfg, torch.device("cpu"))  # the next configuration runs
    assert row["status"] == "ok" and row["img_per_sec"] > 0


def test_a_model_pinned_to_a_kernel_this_machine_lacks_is_skipped_with_the_reason(tmp_path):
    models = "{vim:{name:vim_ti,depth:2},vim_mamba_ssm:{name:vim_ti,depth:2,kernel:cuda}}"
    run = run_cli("bench", "bench=fig1", *CPU, "bench.resolutions=[32]", "~bench.models", f"+bench.models={models}",
                  "bench.baseline=vim", f"out_dir={tmp_path}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in record["rows"]] == ["vim"]
    assert "needs a CUDA GPU" in record["skipped"]["vim_mamba_ssm"]
    assert "skipping vim_mamba_ssm" in run.stdout


def test_every_bench_config_names_a_tool_with_a_run_function():
    import importlib

    from hydra import compose, initialize_config_dir

    from vimexp import bench
    from vimexp.cli import CONF_DIR, group_choices
    names = group_choices("bench")
    assert {"fig1", "fig3_4", "train", "train_hier", "mixer", "ddp", "speedup"} <= set(names)
    for name in names:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("bench", overrides=[f"bench={name}", "paths.output_dir=."])
        assert cfg.bench.name == name and cfg.bench.tool in bench.TOOLS
        assert callable(importlib.import_module(f"vimexp.bench.{cfg.bench.tool}").run)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):  # the mixer's own timing protocol
        cfg = compose("bench", overrides=["bench=mixer", "paths.output_dir=."])
    assert (cfg.warmup, cfg.repeats, cfg.iters) == (3, 15, 1)


def test_gpu_benchmarks_on_a_cpu_say_why_in_one_line(tmp_path):
    mixer = run_cli("bench", "bench=mixer", "device=cpu", f"out_dir={tmp_path}", cwd=tmp_path)
    assert mixer.returncode == 2 and "error: bench=mixer" in mixer.stderr and "needs a CUDA GPU" in mixer.stderr
    if not torch.cuda.is_available():
        ddp = run_cli("bench", "bench=ddp", "bench.devices=2", f"out_dir={tmp_path}", cwd=tmp_path)
        assert ddp.returncode == 2 and "bench.devices=2 needs as many GPUs" in ddp.stderr


def test_speedup_figure_from_the_kept_runs(tmp_path):
    run = run_cli("bench", "bench=speedup", f"out_dir={tmp_path}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "speedup_h200.png").stat().st_size > 10_000
    assert (ROOT / "experiments/results/fused_scan/h200/speedup_h200.png").is_file()  # the README's copy


def test_sweep_blocks_reach_the_kernels_and_leave_the_tuned_ones_alone():
    pytest.importorskip("triton")
    import copy

    from vimexp.bench.mixer import BlocksBackend
    from vimexp.models.vim import VimMixer
    from vimexp.ops import fused_mixer as fm

    tuned = copy.deepcopy(fm.tuned())
    small = fm.with_blocks(seq=dict(BD=8, CL=5), seq_long=dict(BD=4, CL=5), seq_bwd=dict(BD=4),
                           conv=dict(BE=8, BT=16), conv_dpre=dict(BE=8, BT=4, SEG=8))
    assert small.seq == dict(BD=8, CL=5, num_warps=1) and fm.tuned() == tuned
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU: Triton's interpreter (conftest)
    torch.manual_seed(0)
    ref = VimMixer(8, kernel="torch").double()
    fused = copy.deepcopy(ref).float().to(device)
    fused.backend = BlocksBackend(small)
    x = torch.randn(2, 19, 8, dtype=torch.float64, requires_grad=True)  # 19 tokens: 4 chunks of 5 at these blocks
    xf = x.detach().float().to(device).requires_grad_()
    ref(x).sum().backward()
    out = fused(xf)
    out.sum().backward()
    rel = lambda a, b: ((a.detach().double().cpu() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(out, ref(x)) <= 1e-4 and rel(xf.grad, x.grad) <= 1e-4
    assert fm.tuned() == tuned  # nothing written into the tuned tables
    fused.backend = BlocksBackend(fm.with_blocks(seq=dict(BD=3)))  # not a power of two: Triton refuses the block
    with pytest.raises(Exception, match="power of 2"):
        with torch.no_grad():
            fused(xf)


def test_loader_bench_times_each_worker_count_on_generated_photo_jpegs(tmp_path):
    run = run_cli("bench", "bench=loader", "bench.workers=[0,2]", "bench.batch=4", "bench.rounds=1",
                  "bench.stage_images=5",
                  f"bench.root={tmp_path / 'jpegs'}",
                  "bench.generate={classes:2,train_per_class:12,val_per_class:2,width:80,height:60}",
                  f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["workers"] for r in record["rows"]] == [0, 2] and all(r["img_per_sec"] > 0 for r in record["rows"])
    assert record["rows"][1]["img_per_sec_per_worker"] == pytest.approx(record["rows"][1]["img_per_sec"] / 2, abs=0.1)
    assert "data=imagenet" in record["train_overrides"] and record["environment"]["cpus"] >= 1
    stages = record["stage_ms_per_image"]  # a worker's image, stage by stage: the decode, then timm's transforms
    assert list(stages)[:3] == ["decode", "RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert "RandAugment" in stages and all(ms > 0 for ms in stages.values())
    files = sorted((tmp_path / "jpegs" / "train").glob("*/*.JPEG"))
    assert len(files) == 24 and Image.open(files[0]).size == (80, 60)
    too_many = run_cli("bench", "bench=loader", "bench.workers=[0]", "bench.batch=4", "bench.rounds=50",
                       f"bench.root={tmp_path / 'jpegs'}",
                       "bench.generate={classes:2,train_per_class:12,val_per_class:2,width:80,height:60}",
                       f"out_dir={tmp_path / 'out2'}", cwd=tmp_path)
    message = too_many.stderr.strip().splitlines()[-1]
    assert too_many.returncode == 2 and "bench.rounds=50 with 0 workers needs 51 batches" in message


def test_loader_bench_times_the_workers_that_crop_and_leave_the_resize_to_the_device(tmp_path):
    """data.resize_on=device through the real loaders (workers collate the crops end to end): the stages are the
    decode, the crop and the draws that need only the image's size."""
    run = run_cli("bench", "bench=loader", "bench.workers=[0,2]", "bench.batch=4", "bench.rounds=1",
                  "bench.stage_images=5", f"bench.root={tmp_path / 'jpegs'}",
                  "bench.generate={classes:2,train_per_class:12,val_per_class:2,width:80,height:60}",
                  "bench.train_overrides=['data=imagenet','data.rand_augment_on=device','data.resize_on=device']",
                  f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(r["img_per_sec"] > 0 for r in record["rows"])
    assert list(record["stage_ms_per_image"]) == ["decode", "DeviceResizedCrop", "rand_augment_draws", "erase_draws"]


def test_photo_jpegs_weigh_what_imagenet_photos_do(tmp_path):
    from vimexp.data.synthetic import _photo
    _photo((tmp_path / "a.JPEG", [0, 1], 500, 375))
    assert Image.open(tmp_path / "a.JPEG").size == (500, 375)
    assert 60_000 < (tmp_path / "a.JPEG").stat().st_size < 130_000  # ImageNet's train JPEGs average about 110 KB


def test_pipeline_bench_runs_the_cli_per_variant_and_keeps_a_failed_runs_log(tmp_path):
    """bench=pipeline: the real CLI on generated JPEGs beside the step alone; a variant that fails is recorded with
    its exit status and the end of its log, the others measured, and the bench ends with a one-line error."""
    run = run_cli("bench", "bench=pipeline", "device=cpu", "kernel=torch", "warmup=1", "repeats=1", "iters=1",
                  "bench.res=32", "bench.batch=4", "bench.workers=0", "bench.epochs=1", "bench.precision=fp32",
                  "bench.photo.classes=2", "bench.photo.train_per_class=12", "bench.photo.val_per_class=2",
                  "bench.photo.width=80", "bench.photo.height=60", "~bench.models",  # root: the default, under data_dir
                  "+bench.models={tiny:{experiment:imagenet_vim_ti,"
                  "name:vim_ti,depth:2}}", "~bench.variants",
                  "+bench.variants={workers:['data.rand_augment_on=workers'],bad:['data.rand_augment_on=nowhere']}",
                  f"bench.work={tmp_path / 'runs'}", "bench.train_overrides=['data.mixup_group=4']",
                  f"out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert run.returncode == 2 and "a training run failed" in run.stderr.strip().splitlines()[-1]
    row, = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert row["model"] == "tiny" and row["step_status"] == "ok" and row["step_img_per_sec"] > 0
    ok, bad = row["runs"]["workers"], row["runs"]["bad"]
    assert ok["status"] == "ok" and len(ok["epochs_img_per_sec"]) == 1 and ok["epochs_img_per_sec"][0] > 0
    assert ok["share_of_step"] == [round(ok["epochs_img_per_sec"][0] / row["step_img_per_sec"], 3)]
    assert bad["status"] == "failed" and bad["exit"] == 2 and "rand_augment_on=nowhere" in bad["log_tail"]
    assert (tmp_path / "runs" / "tiny_bad" / "stdout.log").is_file()
    assert len(list((tmp_path / "data" / "photo_jpegs" / "train").glob("*/*.JPEG"))) == 24
