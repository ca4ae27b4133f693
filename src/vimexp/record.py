"""What a run leaves behind to say what it was: results.json (metrics and what produced them), the git commit, the
machine and package versions. Written atomically: a crash never leaves a half-written record."""
import datetime
import json
import os
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    """The checkout's commit (-dirty with local changes); VIMEXP_COMMIT wins, for a copy of the tree whose .git is
    stale or missing (a GPU node the tree was copied to)."""
    if os.environ.get("VIMEXP_COMMIT"):
        return os.environ["VIMEXP_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def write_json(path: Path, data: dict):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def environment(device: torch.device) -> dict:
    """Date, commit, device and driver, and the versions of the packages that decide speed."""
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
           "torch": torch.__version__, "device": "cpu"}
    for pkg in ("mamba_ssm", "causal_conv1d", "timm", "triton"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            env[pkg] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.split()[0]
        except Exception:
            env["driver"] = None
    return env


def run_record(cfg, task, trainer: L.Trainer, trained: bool = False) -> dict:
    """results.json: the final and best validation metrics (top-1/top-5 of the raw and EMA weights, or mIoU/mAcc/aAcc,
    or box/mask AP), and what produced them."""
    history = task.history
    metrics = sorted({k for row in history for k in row if k not in ("epoch", "step")})
    wandb_ids = [lg.version for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    choices = HydraConfig.get().runtime.choices
    return {
        "run_name": cfg.run_name,
        "task": task.kind,
        "table": cfg.get("table"),
        "table_preset": cfg.get("table_preset"),
        "table_row": cfg.get("table_row"),
        "experiment": choices.get("experiment"),
        "ablation": choices.get("ablation"),
        "overrides": list(HydraConfig.get().overrides.task),
        "model": cfg.model.name,
        "params": task.num_params,
        "final": {k: history[-1].get(k) for k in metrics} if history else {},
        "best": {k: max(row[k] for row in history if k in row) for k in metrics},
        "epochs": len(history),
        "train_img_per_sec": task.img_per_sec,
        "wall_seconds": round(task.wall_seconds(), 1) if trained else None,  # in fit, over all of a resumed run
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "git_commit": git_commit(),
        "wandb_run_id": wandb_ids[0] if wandb_ids else None,
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
