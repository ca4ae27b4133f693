"""Train a model: `python -m vimexp.train [experiment=...] [ablation=...] [key=value ...]` (see conf/train.yaml)."""
import json
import os
from contextlib import contextmanager
from pathlib import Path

from vimexp.cli import exit_on_help
exit_on_help("train", __name__)  # `--help` answered before Lightning and torch are imported: in a second

import lightning as L
from filelock import FileLock, Timeout
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf, open_dict

from vimexp import VimexpError
from vimexp.build import build_datamodule, build_loggers, build_task, build_trainer
from vimexp.callbacks import BatchSeed, CheckpointOnSignal, SaveConfig
from vimexp.cli import cli, end_the_run_s_processes, lost_a_process, resume_command, run_overrides, save_run_config
from vimexp.curves import write_curves
from vimexp.models.checkpoint import check_compatible, read_checkpoint
from vimexp.record import run_record, write_json


def resolve_ckpt_path(cfg) -> str | None:
    """The checkpoint to resume from: ckpt_path as given, the newest last.ckpt of this run_name for `last`, or (with
    none given) the run directory's own last.ckpt: a requeued or re-run job picks up where it stopped."""
    in_place = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path is None and in_place.is_file():
        print(f"resuming from {in_place} (this run directory already holds a last.ckpt)")
        return str(in_place)
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
            raise VimexpError(f"ckpt_path {cfg.ckpt_path} does not exist: pass a .ckpt file or ckpt_path=last")
        return cfg.ckpt_path
    run_dir = newest_run_like_this(cfg)
    last = run_dir / "checkpoints" / "last.ckpt"
    print(f"resuming from {last}, in its run directory {run_dir}")
    move_run_log(Path(cfg.paths.output_dir), run_dir)
    with open_dict(cfg):  # continue there: its best score, metrics.csv and results.json go on
        cfg.paths.output_dir = str(run_dir)
    return str(last)


def newest_run_like_this(cfg) -> Path:
    """ckpt_path=last: the newest run of this run_name with a last.ckpt that this command started, up to
    trainer.max_epochs (raising it extends a finished run); a run another command started is never taken for it."""
    runs = Path(cfg.paths.log_dir) / cfg.task_name / cfg.run_name
    found = sorted((p.parents[1] for p in runs.glob("*/checkpoints/last.ckpt")),
                   key=lambda d: (d / "checkpoints" / "last.ckpt").stat().st_mtime)
    if not found:
        raise VimexpError(f"ckpt_path=last: no last.ckpt under {runs}/*/checkpoints: nothing to resume for "
                          f"run_name={cfg.run_name}")
    def what(overrides):  # what makes the run, beside how long it trains
        return sorted(o for o in run_overrides(overrides) if not o.startswith("trainer.max_epochs="))
    mine = what(None)
    started = {d: saved_overrides(d) for d in found}
    same = [d for d in found if started[d] is not None and what(started[d]) == mine]
    if not same:
        newest = found[-1]
        how = (f"resume it with: {resume_command(newest, started[newest])}" if started[newest] is not None
               else "its .hydra/overrides.yaml is missing: resume it with its own command and hydra.run.dir="
                    f"{newest}")
        raise VimexpError(f"ckpt_path=last: no run of run_name={cfg.run_name} under {runs} was started with this "
                          f"command's overrides; the newest, {newest}, was started with others: {how}")
    return same[-1]


def saved_overrides(run_dir: Path) -> list[str] | None:
    """The overrides a run directory's run was started with (its .hydra/overrides.yaml), None if it has none."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(saved)) if saved.is_file() else None


def move_run_log(new_dir: Path, run_dir: Path) -> None:
    """ckpt_path=last continues in an older run's directory: this job's log goes on in that run's run.log, and the
    directory Hydra opened for the job, left holding nothing, is removed."""
    import logging
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == new_dir.resolve():
            handler.close()
            old = Path(handler.baseFilename)
            handler.baseFilename, handler.mode = str(run_dir.resolve() / old.name), "a"
            old.unlink(missing_ok=True)
    if new_dir.is_dir() and not any(new_dir.iterdir()):
        new_dir.rmdir()


def trained_epochs(run_dir: Path) -> int:
    """The epochs a finished run trained (its results.json), 0 for one that has not finished."""
    results = run_dir / "results.json"
    return json.loads(results.read_text()).get("epochs", 0) if results.is_file() else 0


def check_resumable(path: str):
    """Fail now, with the way out, on a checkpoint that can't be read (a crash mid-write of an older vimexp)."""
    try:
        return read_checkpoint(path)
    except VimexpError as e:
        other = [p for p in sorted(Path(path).parent.glob("*.ckpt")) if str(p) != str(path)]
        hint = f"; resume from another checkpoint instead: ckpt_path={other[-1]}" if other else ""
        raise VimexpError(f"{e}{hint}") from None


@contextmanager
def run_directory_lock(out: Path):
    """One process a run directory: a second one aimed at it is refused. The OS drops the lock with its process, so
    a killed run leaves no stale lock. Rank 0 holds it; DDP's other ranks share the directory."""
    if rank_zero_only.rank != 0:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(out / ".lock"), out / ".lock.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = owner.read_text().strip() if owner.is_file() else "?"
        raise VimexpError(f"run directory {out} is in use by another process (pid {pid}): wait for it to end, or "
                          "start this run elsewhere (a new run directory is the default)") from None
    owner.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def lost_a_peer(e: Exception, step: int, timeout) -> str | None:
    """How another process of the run failed this one's collective, if that is what `e` says: it stopped answering
    (the collective timed out: gloo's messages, or NCCL's watchdog) or it is gone (NCCL's error, gloo's closed
    socket)."""
    import torch.distributed as dist
    # gloo says "Timed out waiting" where its own wait expires, "Application timeout caused pair closure" where the
    # timeout closed the connection under a send or receive in progress
    if any(s in str(e) for s in ("Timed out waiting", "collective operation timeout",
                                 "Application timeout caused pair closure")):
        return (f"stopped answering (a collective waited {timeout} for it at step {step}; "
                "trainer.strategy.timeout.minutes sets how long)")
    if isinstance(e, dist.DistError) or any(s in str(e) for s in ("Connection reset by peer",
                                                                  "Connection closed by peer")):
        return f"ended (seen at step {step})"
    return None


def train(cfg) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    finished = Path(cfg.paths.output_dir) / "results.json"
    if cfg.ckpt_path is None and finished.is_file():  # a re-run sweep: this job is done
        print(f"already finished: {finished} (skipped; to train again, start a new run directory)")
        return {"skipped": True, "output_dir": str(finished.parent)}
    ckpt_path = resolve_ckpt_path(cfg)
    out = Path(cfg.paths.output_dir)
    if cfg.ckpt_path == "last" and 0 < cfg.trainer.max_epochs <= (done := trained_epochs(out)):
        print(f"already finished: {out / 'results.json'} ({done} epochs; skipped; raise "
              "trainer.max_epochs to train on)")
        return {"skipped": True, "output_dir": str(out)}
    with run_directory_lock(out):
        if rank_zero_only.rank == 0:
            save_run_config(cfg, out)
        task = build_task(cfg)
        if ckpt_path:  # fail now, not after the data is set up, when the checkpoint is another model's
            check_compatible(task, check_resumable(ckpt_path)["state_dict"])
        datamodule = build_datamodule(cfg)
        saved = SaveConfig(cfg)
        resume = resume_command(out)
        callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
        callbacks += [BatchSeed(cfg.seed), saved, CheckpointOnSignal(resume)]
        trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
        for logger in trainer.loggers:  # the whole run's config (W&B, hparams.yaml), not only the task's arguments
            logger.log_hyperparams(saved.config)
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        except Exception as e:
            timeout = getattr(trainer.strategy, "_timeout", None)
            lost = trainer.world_size > 1 and lost_a_peer(e, trainer.global_step, timeout)
            if lost:  # before the launcher's watch saw it (cli.py)
                end_the_run_s_processes()
                raise VimexpError(lost_a_process(trainer.world_size, lost, out, resume)) from e
            raise
        record = run_record(cfg, task, trainer, trained=True)
        if trainer.is_global_zero:
            write_json(out / "results.json", record)
            monitor = task.hparams.monitor
            curves = "curves.png, " if write_curves(out, monitor) else ""  # none without a metrics.csv to draw
            best = record["best"].get(monitor)
            print(f"results in {out.resolve()} (results.json, {curves}checkpoints/, metrics.csv)"
                  + (f": best {monitor} {best:.2f}%" if best is not None else ""))
    return record


def main():
    cli(train, "train")


if __name__ == "__main__":
    main()
