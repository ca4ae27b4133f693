"""What the CLI keeps of the model step: `python -m vimexp.train` on photo-sized JPEGs made on the node, for each
model and each variant of the data pipeline, against the same model's step alone (bench=train's: forward, backward
and fused AdamW on random data, as CUDA graphs by default):

    python -m vimexp.bench bench=pipeline [bench.models=...] [bench.variants=...] [bench.workers=14]

Each run's img/s is the CLI's own (train/img_per_sec of every epoch, from its second batch to its last; loader,
transfer hooks, EMA, logging and Lightning included). A run that fails is recorded with its exit status and the end
of its log (kept beside it under bench.work) and the others go on. Writes results.json to out_dir.
"""
import csv
import os
import subprocess
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.bench import command, pick_device, say
from vimexp.bench.backbones import PRECISIONS, measure
from vimexp.bench.ddp import train
from vimexp.bench.timing import spin_up
from vimexp.data.synthetic import ensure_photo_folder
from vimexp.record import environment, write_json


def cli_run(run_dir: Path, overrides: list[str], timeout_min: float) -> dict:
    """One training run through the CLI, its log in run_dir/stdout.log: the img/s of each epoch, or why it failed."""
    if run_dir.exists() and any(run_dir.iterdir()):  # the CLI would resume the run there, and append to its metrics
        raise VimexpError(f"{run_dir} holds an earlier run: set bench.work to a new directory")
    process = train(run_dir, overrides, gpus="0")
    try:
        rc = process.wait(timeout=60 * timeout_min)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        rc = f"timed out after bench.timeout_min={timeout_min}"
    log = run_dir / "stdout.log"
    epochs = []
    for metrics in run_dir.glob("**/metrics.csv"):
        with open(metrics) as f:
            epochs += [round(float(r["train/img_per_sec"]), 1) for r in csv.DictReader(f) if r.get("train/img_per_sec")]
    if rc != 0:
        return {"status": "failed", "exit": rc, "epochs_img_per_sec": epochs, "log": str(log),
                "log_tail": log.read_text(errors="replace")[-2000:]}
    return {"status": "ok", "epochs_img_per_sec": epochs}


def model_step(spec: dict, cfg, device) -> dict:
    """bench=train's measurement of one model at the runs' batch, resolution and precision."""
    b = cfg.bench
    step_cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    step_cfg.merge_with({"bench": {"mode": "train", "neck": False}, "cuda_graph": b.step_cuda_graph})
    return measure(spec["name"], {k: v for k, v in spec.items() if k != "experiment"}, b.res, b.batch, b.precision,
                   step_cfg, device)


def run(cfg) -> dict:
    b = cfg.bench
    if b.precision not in PRECISIONS:
        raise VimexpError(f"bench.precision={b.precision}: choose one of {', '.join(PRECISIONS)}")
    device = pick_device(cfg.device)
    photo = OmegaConf.to_container(b.photo, resolve=True)
    root = ensure_photo_folder(photo.pop("root"), **photo)
    common = [f"data.root={root}", f"data.num_classes={photo['classes']}", f"data.batch_size={b.batch}",
              f"data.img_size={b.res}", f"data.num_workers={b.workers}", f"trainer.max_epochs={b.epochs}",
              f"trainer.precision={'bf16-mixed' if b.precision == 'bf16' else '32'}", f"model.kernel={cfg.kernel}",
              "logger=csv", *b.train_overrides]
    record = {"environment": {**environment(device), "cpus": os.cpu_count()}, "command": command(),
              "common_overrides": common, "rows": []}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        spin_up(device, cfg.spinup_s)
    for key, spec in tqdm(b.models.items(), desc="bench", unit="model"):
        spec = OmegaConf.to_container(spec)
        model = [f"experiment={spec['experiment']}",
                 *(f"++model.{k}={v}" for k, v in spec.items() if k not in ("experiment", "name"))]
        step = model_step(spec, cfg, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the step's memory back to the device before the runs start
        row = {"model": key, "step_img_per_sec": step.get("img_per_sec"), "step_status": step["status"], "runs": {}}
        record["rows"].append(row)
        for name, variant in b.variants.items():
            result = cli_run(Path(b.work) / f"{key}_{name}", [*model, *common, *variant], b.timeout_min)
            if step.get("img_per_sec") and result["epochs_img_per_sec"]:
                result["share_of_step"] = [round(e / step["img_per_sec"], 3) for e in result["epochs_img_per_sec"]]
            row["runs"][name] = {"overrides": list(variant), **result}
            shares = ", ".join(f"{s:.0%}" for s in result.get("share_of_step", []))
            say(f"{key:8s} {name:10s} {result['status']}: {result['epochs_img_per_sec']} img/s"
                + (f" ({shares} of the step's {step['img_per_sec']})" if shares else ""))
            write_json(out / "results.json", record)  # after each run: a bench cut short keeps what finished
    write_json(out / "results.json", record)  # the steps alone too, where bench.variants is empty
    print(f"results in {(out / 'results.json').resolve()}")
    if any(r["status"] != "ok" for row in record["rows"] for r in row["runs"].values()):
        raise VimexpError(f"a training run failed: its log is named in {out / 'results.json'}")
    return record
