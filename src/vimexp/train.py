"""Train a model: `python -m vimexp.train [experiment=...] [ablation=...] [key=value ...]` (see conf/train.yaml)."""
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vimexp import VimexpError
from vimexp.build import build_datamodule, build_loggers, build_task, build_trainer
from vimexp.cli import cli
from vimexp.models.checkpoint import check_compatible, read_checkpoint
from vimexp.record import run_record, write_json


class EpochSeed(L.Callback):
    """Reseed every RNG at each epoch's first batch from (seed, epoch): mixup and drop path of an epoch then don't
    depend on what ran before it (the data loader's start-up draws included), so a run resumed at an epoch boundary
    continues exactly. Data order and augmentation are seeded per sample by the datamodule."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            L.seed_everything(self.seed + trainer.current_epoch, workers=True, verbose=False)


class SaveConfig(L.Callback):
    """Keep the run's resolved config in every checkpoint, so that eval (and a reader) know what made the weights."""

    def __init__(self, cfg):
        run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # composed in-process, cfg has it
        self.config = OmegaConf.to_container(run, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["vimexp_config"] = self.config


def resolve_ckpt_path(cfg) -> str | None:
    in_place = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path is None and in_place.is_file():  # a requeued job (SLURM preemption, time limit) picks up its run
        print(f"resuming from {in_place} (this run directory already holds a last.ckpt)")
        return str(in_place)
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
            raise VimexpError(f"ckpt_path {cfg.ckpt_path} does not exist: pass a .ckpt file or ckpt_path=last")
        return cfg.ckpt_path
    runs = Path(cfg.paths.log_dir) / cfg.task_name / cfg.run_name
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise VimexpError(f"ckpt_path=last: no last.ckpt under {runs}/*/checkpoints: nothing to resume for "
                          f"run_name={cfg.run_name}")
    print(f"resuming from {found[-1]}")
    return str(found[-1])


def train(cfg) -> dict:
    started = time.time()
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    task = build_task(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:  # fail now, not after the data is set up, when the checkpoint is another model's
        check_compatible(task, read_checkpoint(ckpt_path)["state_dict"])
    datamodule = build_datamodule(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [EpochSeed(cfg.seed), SaveConfig(cfg)]
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    record = run_record(cfg, task, trainer, started)
    if trainer.is_global_zero:
        write_json(out / "results.json", record)
        monitor = cfg.task.get("monitor", "val/acc1")
        best = record["best"].get(monitor)
        print(f"results in {out.resolve()} (results.json, checkpoints/, metrics.csv)"
              + (f": best {monitor} {best:.2f}%" if best is not None else ""))
    return record


def main():
    cli(train, "train")


if __name__ == "__main__":
    main()
