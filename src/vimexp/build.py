"""Build a run's pieces from its composed config: the datamodule and the task (each config group names its class with
`_target_`), the loggers and the Lightning Trainer (with atomic checkpoint writes)."""
import os
from importlib.util import find_spec
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from vimexp import VimexpError


def build_datamodule(cfg, **overrides) -> L.LightningDataModule:
    return instantiate(cfg.data, seed=cfg.seed, **overrides, _convert_="all")


def build_task(cfg, **overrides) -> L.LightningModule:
    """The task of `cfg.task._target_` around the model, optimizer and scheduler configs (as plain dicts: they are the
    task's hyper-parameters, saved in every checkpoint)."""
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "optimizer", "scheduler")}
    return instantiate(cfg.task, **plain, num_classes=cfg.data.num_classes, global_batch_size=cfg.data.batch_size,
                       **overrides, _convert_="all")


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
