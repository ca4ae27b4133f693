"""What train and eval share: config checks, building the pieces from a config, and the run record."""
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies.launchers import subprocess_script
from omegaconf import OmegaConf

from vimexp import VimexpError
from vimexp.data.ade20k import ADE20KDataModule
from vimexp.data.coco import CocoDataModule
from vimexp.data.imagefolder import ImageFolderDataModule
from vimexp.tasks.classification import ClassificationTask
from vimexp.tasks.detection import DetectionTask
from vimexp.tasks.segmentation import SegmentationTask

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OmegaConf.register_new_resolver("wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"), replace=True)
OmegaConf.register_new_resolver("name_join", lambda *parts: "-".join(str(p) for p in parts if p), replace=True)
OmegaConf.register_new_resolver("tags_with", lambda tags, *extra: [*tags, *(e for e in extra if e)], replace=True)


def check_choices(argv: list[str]):
    """Unknown config-group options (experiment=foo, ablation=a,b, ...) fail in one line, listing the choices."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        group = CONF_DIR / key
        if not sep or "." in key or not group.is_dir() or "(" in value or value in ("null", ""):
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option not in choices:
                raise VimexpError(f"unknown {key} {option!r}: choose one of {', '.join(choices)}")


@contextmanager
def one_line_errors():
    """Print a VimexpError (also one re-raised from a DataLoader worker) as one line and exit with status 2."""
    try:
        yield
    except VimexpError as e:
        print(f"error: {_last_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a VimexpError from a worker process comes back as another type, traceback in the text
        if "VimexpError" not in str(e):
            raise
        print(f"error: {_last_line(e)}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def isolated_job():
    """Undo what a job set up for itself, so that the next job of a multirun starts clean: its W&B run, its DDP process
    group, and the rank variables Lightning's launcher put into the environment (with LOCAL_RANK still set, the next
    job would take itself for a child process and wait for ranks that nobody starts)."""
    env = dict(os.environ)
    try:
        yield
    finally:
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1].split("VimexpError: ", 1)[-1]


DATAMODULES = {"imagefolder": ImageFolderDataModule, "ade20k": ADE20KDataModule, "coco": CocoDataModule}  # by data.format
TASKS = {"classification": ClassificationTask, "segmentation": SegmentationTask, "detection": DetectionTask}  # by task.name


def build_datamodule(cfg, **overrides):
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return DATAMODULES[data.pop("format", "imagefolder")](**{**data, "seed": cfg.seed, **overrides})


def build_task(cfg, **overrides):
    c = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "optimizer", "scheduler", "data", "task")}
    task = {k: v for k, v in c["task"].items() if k not in ("name", "monitor")}
    return TASKS[c["task"].get("name", "classification")](
        model=c["model"], optimizer=c["optimizer"], scheduler=c["scheduler"], num_classes=c["data"]["num_classes"],
        global_batch_size=c["data"]["batch_size"], **{**task, **overrides})


def build_loggers(cfg) -> list:
    loggers = []
    for name, conf in (cfg.get("logger") or {}).items():
        if "WandbLogger" in conf.get("_target_", "") and find_spec("wandb") is None:
            raise VimexpError("logger.wandb needs the wandb package: `pip install wandb`, or run with logger=csv")
        loggers.append(instantiate(conf))
    return loggers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target and rename it into place: a crash never leaves a truncated file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def build_trainer(cfg, callbacks=(), loggers=()) -> L.Trainer:
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns preemption and timeout requeue; Lightning's own would race it
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), callbacks=list(callbacks),
                     logger=list(loggers) or False, plugins=plugins, default_root_dir=cfg.paths.output_dir,
                     use_distributed_sampler=False)  # the datamodule shards its loaders itself


def ddp_child_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning's DDP launcher runs for local rank > 0: this Hydra job alone, in its own directory.

    Lightning's own command re-runs sys.argv, which under `-m` starts the whole sweep again in every child process
    (lightning-hydra-template #393). Here the child gets the job's overrides and output directory instead.
    """
    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", f"vimexp.{hydra_cfg.job.config_name}", *hydra_cfg.overrides.task,
               f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', "hydra.output_subdir=null",
               f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}"]
    return command, hydra_cfg.runtime.cwd


subprocess_script._hydra_subprocess_cmd = ddp_child_command  # Lightning looks it up here at launch


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(CONF_DIR.parent), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def run_record(cfg, task, trainer: L.Trainer, started: float | None = None) -> dict:
    """results.json: the final and best validation metrics (top-1/top-5 of the raw and EMA weights, or mIoU/mAcc/aAcc),
    and what produced them."""
    history = task.history
    metrics = sorted({k for row in history for k in row if k not in ("epoch", "step")})
    wandb_ids = [lg.version for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
    return {
        "run_name": cfg.run_name,
        "task": cfg.task.get("name", "classification"),
        "table": cfg.get("table"),
        "table_preset": cfg.get("table_preset"),
        "experiment": HydraConfig.get().runtime.choices.get("experiment"),
        "ablation": HydraConfig.get().runtime.choices.get("ablation"),
        "overrides": list(HydraConfig.get().overrides.task),
        "model": cfg.model.name,
        "params": task.num_params,
        "final": {k: history[-1].get(k) for k in metrics} if history else {},
        "best": {k: max(row[k] for row in history if k in row) for k in metrics},
        "epochs": len(history),
        "train_img_per_sec": task.img_per_sec,
        "wall_seconds": round(time.time() - started, 1) if started else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "git_commit": git_commit(),
        "wandb_run_id": wandb_ids[0] if wandb_ids else None,
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }


def write_json(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def cli(run_fn, config_name: str):
    """`python -m vimexp.<name>`: config choices checked up front, the Hydra job run, user errors as one line."""
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg):
        with one_line_errors(), isolated_job():
            return run_fn(cfg)

    with one_line_errors():
        check_choices(sys.argv[1:])
    _main()
