"""Paper tables: ablation configs, rendering from recorded runs, a two-row sweep end to end, fine-tuning starts."""
import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY_RUN, compose_cfg, data_overrides
from vimexp.models import create_model
from vimexp.build import build_task
from vimexp.tables import find_results, load_table, render

ABLATIONS = {"bidir_none": ("none", "mean"), "bidir_seq": ("sequence", "mean"), "bidir_block": ("block", "mean"),
             "bidir_ssm": ("ssm", "mean"), "bidir_ssm_conv": ("ssm_conv", "mean"),
             "cls_mean_pool": ("ssm_conv", "mean"), "cls_max_pool": ("ssm_conv", "max"),
             "cls_head": ("ssm_conv", "head"), "cls_double": ("ssm_conv", "double"),
             "cls_middle": ("ssm_conv", "middle")}


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablation_sets_the_model_variant_and_names_the_run(ablation, tmp_path):
    cfg = compose_cfg([f"ablation={ablation}", "experiment=imagenet_vim_ti", "data.root=/x"], tmp_path)
    assert (cfg.model.bidirectional, cfg.model.pool) == ABLATIONS[ablation]
    assert cfg.run_name == f"imagenet_vim_ti-{ablation}"
    assert ablation in cfg.logger.wandb.tags and cfg.logger.wandb.group == "imagenet_vim_ti"


def _record(out, table, preset, key, value, acc, params=7_148_008, task="classification", extra=()):
    out.mkdir(parents=True)
    best = {"val/acc1": acc} if task == "classification" else {"val/mIoU": acc}
    overrides = [f"table={table}", f"table_preset={preset}", f"{key}={value}", *extra, "sweep_id=0123456789ab"]
    record = {"table": table, "table_preset": preset, "task": task, key: value, "params": params, "overrides": overrides,
              "best": best, "wandb_run_id": f"id-{value}", "output_dir": str(out)}
    (out / "results.json").write_text(json.dumps(record))


def test_render_from_recorded_runs(tmp_path):
    table = load_table("table4")
    _record(tmp_path / "a", "table4", "paper", "ablation", "bidir_none", 73.0)
    _record(tmp_path / "b", "table4", "paper", "ablation", "bidir_ssm_conv", 74.25)
    _record(tmp_path / "c", "table4", "builtin", "ablation", "bidir_block", 50.0)  # another preset: not this table
    _record(tmp_path / "d", "table5", "paper", "ablation", "bidir_ssm", 50.0)  # another table
    _record(tmp_path / "e", "table4", "paper", "ablation", "bidir_block", 33.0, task="segmentation")
    _record(tmp_path / "f", "table4", "paper", "ablation", "bidir_none", 10.0, extra=["trainer.max_epochs=1"])  # a smoke test
    markdown, rows = render(table, "paper", find_results(tmp_path, table, "paper", []))
    by_label = {r["row"]: r for r in rows}
    none = by_label["None (unidirectional Mamba)"]
    assert (none["IN top-1 (ours)"], none["IN top-1 (paper)"], none["IN top-1 (diff)"]) == (73.0, 73.2, -0.2)
    assert none["wandb"] == "id-bidir_none" and none["run"] == str(tmp_path / "a")
    default = by_label["Bidirectional SSM + Conv1d (default)"]
    assert default["IN top-1 (diff)"] == pytest.approx(0.35)
    assert default["ADE20K mIoU (ours)"] is None and default["ADE20K mIoU (paper)"] == 35.9  # no seg runs yet
    block = by_label["Bidirectional Block (Layer)"]
    assert block["IN top-1 (ours)"] is None and block["ADE20K mIoU (ours)"] == 33.0  # a segmentation run's mIoU
    assert block["ADE20K mIoU (diff)"] == pytest.approx(-0.6)
    assert "| None (unidirectional Mamba) | 73.0 | 73.2 | -0.20 |" in markdown
    assert "| Bidirectional SSM | — | 72.8 | — |" in markdown
    smoke = find_results(tmp_path, table, "paper", ["trainer.max_epochs=1"])  # its own overrides find it alone
    assert list(smoke) == [("classification", "bidir_none")] and smoke[("classification", "bidir_none")]["_path"] == \
        str(tmp_path / "f" / "results.json")


def test_table1_cited_rows_and_params(tmp_path):
    table = load_table("table1")
    _record(tmp_path / "v", "table1", "paper", "experiment", "imagenet_vim_ti", 76.0)
    _, rows = render(table, "paper", find_results(tmp_path, table, "paper", []))
    by_label = {r["row"]: r for r in rows}
    assert by_label["ResNet-50"]["top-1 (ours)"] == "cited" and by_label["ResNet-50"]["top-1 (paper)"] == 76.2
    assert by_label["Vim-Ti"]["params (M) (ours)"] == 7.15 and by_label["Vim-Ti"]["top-1 (diff)"] == -0.1


def test_two_row_sweep_end_to_end(tiny_data, tmp_path):
    """`python -m vimexp.tables table4 --rows a,b` runs one multirun of two jobs, then renders them."""
    env = {**os.environ, "WANDB_MODE": "offline", "VIMEXP_ROOT": str(tmp_path)}
    overrides = [*data_overrides(tiny_data), *TINY_RUN, "debug=limit", "logger=default"]
    cmd = [sys.executable, "-m", "vimexp.tables", "table4", "--rows", "bidir_none,bidir_ssm_conv", "--tasks",
           "classification", "--runs", str(tmp_path / "logs"), "--out", str(tmp_path / "out"), "--", *overrides]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" -m vimexp.train -m ") == 1  # one multirun for both rows
    # a line of the bar over the rows before each training run and one at the end, with the elapsed time and the ETA
    assert re.search(r"table4 rows: +0%\|.*\| 0/2 \[00:00<\?, \?row/s\]", run.stderr)
    assert re.search(r"table4 rows: 100%\|.*\| 2/2 \[\d\d:\d\d<00:00,\s+[\d.]+s/row\]", run.stderr)
    jobs = sorted(p for p in (tmp_path / "logs" / "debug" / "multirun").glob("*/*") if p.is_dir())
    assert [j.name.split("_", 1)[1] for j in jobs] == ["builtin-bidir_none", "builtin-bidir_ssm_conv"]
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        assert results["table"] == "table4" and results["wandb_run_id"]
        assert list((job / "wandb").glob("offline-run-*")), "one W&B run per job"
    with open(tmp_path / "out" / "table4_builtin.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert len(rows) == 5
    for label, r in rows.items():
        ran = label.startswith(("None", "Bidirectional SSM + Conv1d"))
        assert (r["IN top-1 (ours)"] != "") == ran and (r["wandb"] != "") == ran, label
        if ran:
            assert 0 <= float(r["IN top-1 (ours)"]) <= 100
            assert float(r["IN top-1 (diff)"]) == pytest.approx(float(r["IN top-1 (ours)"]) - float(r["IN top-1 (paper)"]))
    # re-running skips the finished rows: nothing to train
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "vimexp.train" not in again.stdout


def _independent_resample(pos, src_grid, dst_grid, cls_src, cls_dst):
    """Interpolate the patch rows as a 2D grid; the class-token row moves to its new index unchanged."""
    cls = pos[:, cls_src]
    grid = torch.cat([pos[:, :cls_src], pos[:, cls_src + 1:]], 1)
    grid = grid.reshape(1, src_grid, src_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst_grid, dst_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst_grid * dst_grid, -1)
    return torch.cat([grid[:, :cls_dst], cls[:, None], grid[:, cls_dst:]], 1)


def test_finetune_stride8_starts_from_a_stride16_checkpoint(tmp_path):
    small = dict(depth=2, embed_dim=32, img_size=64, num_classes=10, kernel="torch")
    torch.manual_seed(0)
    source = create_model("vim_ti", **small)
    torch.save({"model": source.state_dict()}, tmp_path / "official.pth")  # the official layout
    cfg = compose_cfg(["experiment=imagenet_vim_ti_ft_stride8", "data.root=/x", "data.img_size=64",
                       "data.num_classes=10", "++model.depth=2", "++model.embed_dim=32", "model.kernel=torch",
                       f"model.init_from={tmp_path / 'official.pth'}", "model.init_pos_embed=correct"],
                      tmp_path / "run")  # the official front-token mode: tests/test_checkpoint_layout.py
    assert (cfg.optimizer.lr * cfg.data.batch_size / 512, cfg.optimizer.weight_decay, cfg.trainer.max_epochs,
            cfg.scheduler.warmup_lr, cfg.scheduler.min_lr, cfg.model.drop_path_rate) == (1e-5, 1e-8, 30, 1e-5, 1e-5, 0)
    model = build_task(cfg).model
    assert model.patch_embed.grid_size == (7, 7)  # stride 8 at 64 px, 16 at stride 16
    src_pos = source.pos_embed.detach()
    assert torch.equal(model.pos_embed[:, 49 // 2], src_pos[:, 16 // 2])  # the middle class token stays itself

    reference = create_model("vim_ti_stride8", **small)
    sd = {k: v for k, v in source.state_dict().items() if k != "pos_embed"}
    sd["pos_embed"] = _independent_resample(src_pos, 4, 7, 16 // 2, 49 // 2)
    reference.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    assert math.isfinite(model(x).sum().item())


def test_table2_and_table4_segmentation_rows_run_through_the_cli(tmp_path):
    """Table 4's mIoU column runs its rows as segmentation jobs (task_presets); Table 2 is segmentation throughout."""
    env = {**os.environ, "WANDB_MODE": "offline", "VIMEXP_ROOT": str(tmp_path)}
    seg = [f"data.root={tmp_path}/seg/ADEChallengeData2016", "data.generate_params={train:16,val:2,size:48,seed:0}",
           "data.batch_size=4", "debug=limit"]
    for table, rows in (("table4", "bidir_ssm_conv"), ("table2", "builtin_seg")):
        extra = ["--tasks", "segmentation"] if table == "table4" else []
        cmd = [sys.executable, "-m", "vimexp.tables", table, "--rows", rows, *extra, "--runs", str(tmp_path / "logs"),
               "--out", str(tmp_path / "out"), "--", *seg]
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "out" / "table4_builtin.csv") as f:
        default = {r["row"]: r for r in csv.DictReader(f)}["Bidirectional SSM + Conv1d (default)"]
    assert default["IN top-1 (ours)"] == "" and 0 <= float(default["ADE20K mIoU (ours)"]) <= 100
    with open(tmp_path / "out" / "table2_builtin.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert rows["UperNet / ResNet-50"]["mIoU (ours)"] == "cited"
    assert 0 <= float(rows["UperNet / Vim-Ti"]["mIoU (ours)"]) <= 100 and rows["UperNet / DeiT-Ti"]["mIoU (ours)"] == ""


def test_table3_detection_rows_run_through_the_cli(tmp_path):
    """Table 3 runs both rows as detection jobs on the built-in COCO-layout data and renders box and mask AP."""
    env = {**os.environ, "WANDB_MODE": "offline", "VIMEXP_ROOT": str(tmp_path)}
    det = [f"data.root={tmp_path}/det", "++data.generate_params={train:8,val:2,size:64,seed:0}", "data.batch_size=4",
           "debug=limit"]
    cmd = [sys.executable, "-m", "vimexp.tables", "table3", "--runs", str(tmp_path / "logs"), "--out",
           str(tmp_path / "out"), "--", *det]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "out" / "table3_builtin.csv") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    for label in ("DeiT-Ti (ViTDet)", "Vim-Ti"):
        assert 0 <= float(rows[label]["AP box (ours)"]) <= 100 and 0 <= float(rows[label]["AP mask (ours)"]) <= 100
        assert rows[label]["APl box (ours)"] == ""  # 64 px scenes hold no large objects: COCOeval has nothing to score
    assert rows["Vim-Ti"]["AP box (paper)"] == "45.7"


def test_render_says_what_it_found_and_never_shrinks_a_table(tmp_path):
    def render_only(*extra):
        cmd = [sys.executable, "-m", "vimexp.tables", "table4", "--render-only", "--runs", str(tmp_path / "runs"),
               "--out", str(tmp_path / "out"), *extra]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)

    (tmp_path / "runs").mkdir()
    none = render_only()
    assert none.returncode == 2 and "no finished run of table4 (builtin)" in none.stderr
    assert not (tmp_path / "out").exists()
    for i, value in enumerate(("bidir_none", "bidir_ssm")):
        _record(tmp_path / "runs" / value, "table4", "builtin", "ablation", value, 50.0 + i)
    two = render_only()
    assert two.returncode == 0 and "2 of 5 rows found; `make table4` runs the rest" in two.stdout
    written = (tmp_path / "out" / "table4_builtin.csv").read_text()
    (tmp_path / "runs" / "bidir_ssm" / "results.json").unlink()
    fewer = render_only()
    assert fewer.returncode == 2 and "1 of 5 rows found, but" in fewer.stderr and "not overwritten" in fewer.stderr
    assert (tmp_path / "out" / "table4_builtin.csv").read_text() == written


def _row_commands():
    """(table, preset, label, the overrides `make <table>` trains that row with) of every trained row."""
    from vimexp.tables import row_overrides, row_value, tasks_of
    for name in ("table1", "table2", "table3", "table4", "table5", "table7"):
        table = load_table(name)
        for task, presets in tasks_of(table).items():
            for preset, shared in presets.items():
                for row in (r for r in table["rows"] if not r.get("cited") and row_value(r, preset)):
                    yield pytest.param([f"table={name}", f"table_preset={preset}", *shared,
                                        f"{table['sweep']}={row_value(row, preset)}", *row_overrides(row, preset)],
                                       id=f"{name}-{task}-{preset}-{row['label']}")


@pytest.mark.parametrize("argv", list(_row_commands()))
def test_every_table_row_composes_through_the_cli_checks(argv, tmp_path):
    """Each row's command passes the CLI's checks (choices, keys, nearest names) and Hydra's composition."""
    from vimexp.cli import check_choices, preflight
    check_choices(argv)
    preflight("train", argv)
    compose_cfg(argv, tmp_path)
