"""Build a run's pieces from its composed config: the datamodule and the task (each config group names its class with
`_target_`), the loggers and the Lightning Trainer (with atomic checkpoint writes)."""
import csv
import errno
import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import OmegaConf

from vimexp import VimexpError
from vimexp.cli import PARENT_ENV


def build_datamodule(cfg, **overrides) -> L.LightningDataModule:
    return _instantiate(cfg.data, seed=cfg.seed, **overrides)


def build_task(cfg, **overrides) -> L.LightningModule:
    """The task of `cfg.task._target_` around the model, optimizer and scheduler configs (as plain dicts: they are the
    task's hyper-parameters, saved in every checkpoint)."""
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "optimizer", "scheduler")}
    task = _instantiate(cfg.task, **plain, num_classes=cfg.data.num_classes, global_batch_size=cfg.data.batch_size,
                        **overrides)
    if cfg.get("compile"):  # in place (Module.compile): the state dict keeps its keys, checkpoints stay portable
        task.model.compile()
    return task


def _instantiate(conf, **kwargs):
    """hydra's instantiate, with the user's error (a VimexpError) passed on as it was, not wrapped in Hydra's."""
    try:
        return instantiate(conf, **kwargs, _convert_="all")
    except InstantiationException as e:
        if isinstance(e.__cause__, VimexpError):
            raise e.__cause__ from None
        raise


def build_loggers(cfg) -> list:
    return [instantiate(conf) for conf in (cfg.get("logger") or {}).values()]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint beside its target and rename it into place: a crash, a full disk or a failed write never
    leaves a truncated file, and never replaces the last good one; weights that are not finite are never written."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        bad = next((k for k, v in checkpoint["state_dict"].items()
                    if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise VimexpError(f"refusing to write {path}: {bad} holds non-finite values (the run diverged); the last "
                              "good checkpoint stays. Lower optimizer.lr")
        tmp, out = path.with_name(f".{path.name}.tmp"), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                out = _KeepsWriteErrors(f)
                torch.save(checkpoint, out)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as a RuntimeError
            tmp.unlink(missing_ok=True)
            cause = out.error if out is not None and out.error is not None else e
            if not isinstance(cause, OSError):
                raise
            why = errno.errorcode.get(cause.errno, "error") if cause.errno else type(cause).__name__
            kept = ("the last good checkpoint stays" if any(path.parent.glob("*.ckpt"))
                    else "no checkpoint was written before")
            raise VimexpError(f"can't write checkpoint {path}: {cause.strerror or cause} ({why}); free space or fix "
                              f"the permissions there, or run elsewhere (paths.log_dir, hydra.run.dir); {kept}") from None


class _KeepsWriteErrors:
    """A file for torch.save that remembers the OS error behind a failed write, which torch reports as a RuntimeError
    without it."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


class AppendingCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing metrics.csv (with a warning on every new run); a resumed run appends to
    it instead, keeping its earlier rows and columns."""

    @property
    @rank_zero_experiment
    def experiment(self) -> "_AppendingWriter":
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self):
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class WandbLogger(LightningWandbLogger):
    """Lightning's, without the `anonymous=None` it always passes to wandb.init, which wandb (0.31) answers with a
    deprecation line on every run. Its banner and summary are conf/logger/wandb.yaml's `settings`. Named as Lightning's:
    record.py and tasks/bookkeeping.py know it by its class name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)


def quiet_lightning():
    """Lightning's console noise, filtered where it is made, each by its message: its tips for its cloud products, the
    TPU line of a machine without one, the count of modules in eval mode (the EMA copy is, by design) and a deprecation
    inside Lightning 2.6 that torch reports on every run. At Trainer build time, not import time: pytest resets the
    warning filters after the imports of each test."""
    warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning,
                            r"lightning\.pytorch\.loops\.fit_loop")
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                            r"lightning\.pytorch\.utilities\._pytree")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_lightning_noise)  # added once, however often called


def _not_lightning_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("💡 Tip:", "TPU available: False"))


def build_trainer(cfg, callbacks=(), loggers=()) -> L.Trainer:
    quiet_lightning()
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit owns preemption and timeout requeue; Lightning's own would race it
        plugins.append(SLURMEnvironment(auto_requeue=False))
    options = {"enable_model_summary": False,  # its 15-line table; the parameter count is in results.json
               **OmegaConf.to_container(cfg.trainer, resolve=True)}
    if isinstance(options["strategy"], dict):  # a configured one (trainer=ddp: its collective timeout)
        options["strategy"] = instantiate(cfg.trainer.strategy)
    try:
        trainer = L.Trainer(**options, callbacks=list(callbacks), logger=list(loggers) or False, plugins=plugins,
                            default_root_dir=cfg.paths.output_dir,
                            use_distributed_sampler=False)  # the datamodule shards its loaders itself
    except (ValueError, TypeError, MisconfigurationException) as e:  # a trainer.* value Lightning refuses
        settings = ", ".join(f"{k}={options[k]}" for k in ("accelerator", "devices", "precision") if k in options)
        raise VimexpError(f"Lightning refused the trainer settings ({settings}): {str(e).strip().splitlines()[0]} "
                          "Fix the trainer.* override (trainer=cpu where there is no GPU)") from None
    if trainer.world_size > 1 and not trainer.strategy.cluster_environment.creates_processes_externally:
        os.environ[PARENT_ENV] = str(os.getpid())  # the DDP children Lightning starts die with this process
    return trainer
