"""The benchmark harness in its CPU mode: every configuration measured, results written, OOM handling. No timing is
asserted: only that the harness produces complete, well-formed records."""
import csv
import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_cli
from vimexp import bench as bench_mod
from vimexp.tasks.necks import PyramidBackbone

CPU = ["device=cpu", "kernel=torch", "warmup=1", "repeats=2", "iters=1", "bench.batch_sizes=[2]",
       "bench.precisions=[fp32]"]


@pytest.mark.parametrize("name,res", [("fig1", "[32,64]"), ("fig3_4", "[64]"), ("train", "[32]")])
def test_bench_cli_on_cpu(name, res, tmp_path):
    models = "{vim:{name:vim_ti,depth:4},deit_eager:{name:deit_ti,attn:eager,depth:2}}"
    run = run_cli("bench", f"bench={name}", *CPU, f"bench.resolutions={res}", f"~bench.models", f"+bench.models={models}",
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
        m.setattr(bench_mod, "_time", out_of_memory)
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
