"""The command line of every entry point (`python -m vimexp.train|eval|bench`): config choices checked up front, one
Hydra job per run (isolated from the next job of a multirun), and user errors printed as one line."""
import difflib
import hashlib
import inspect
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from vimexp import VimexpError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def setup():
    """What a Hydra run of vimexp needs before composing: the config resolvers, and Lightning's DDP launcher told how
    to start this job's child processes. Idempotent; the CLI calls it, and so can code composing configs itself."""
    OmegaConf.register_new_resolver("wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"), replace=True)
    OmegaConf.register_new_resolver("name_join", lambda *parts: "-".join(str(p) for p in parts if p), replace=True)
    OmegaConf.register_new_resolver("tags_with", lambda tags, *extra: [*tags, *(e for e in extra if e)], replace=True)
    from lightning.pytorch.strategies.launchers import subprocess_script
    subprocess_script._hydra_subprocess_cmd = ddp_child_command  # Lightning looks it up here at launch


def sweep_id(argv: list[str]) -> str:
    """A multirun's directory name from its command line: the same command continues the same sweep, its finished
    jobs skipped and one cut short resumed."""
    args = sorted(a for a in argv if a not in ("-m", "--multirun"))
    return hashlib.sha1("\n".join(args).encode()).hexdigest()[:12]


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


def group_choices(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml); files starting with `_` are bases, not choices."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_choices(argv: list[str]):
    """Unknown config-group options (experiment=foo, ablation=a,b, ...) fail in one line, listing the choices."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or "." in key or not (CONF_DIR / key).is_dir() or "(" in value or value in ("null", ""):
            continue
        choices = group_choices(key)
        for option in value.split(","):
            if option not in choices:
                raise VimexpError(f"unknown {key} {option!r}: choose one of {', '.join(choices)}")


def preflight(config_name: str, argv: list[str]):
    """Before Hydra starts: a key that isn't in the config fails in one line naming the nearest one (Hydra's own hint,
    to add it with +, leads to a traceback later), and so does a log directory that can't be written. Composes the
    config once with the command line's group choices and paths."""
    pairs = [a.split("=", 1) for a in argv if "=" in a and not a.startswith(("+", "~", "-", "hydra."))]
    choices = [f"{k}={v.split(',')[0]}" for k, v in pairs if ("." not in k and (CONF_DIR / k).is_dir())
               or k.startswith("paths.")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=choices)
    log_dir = Path(cfg.paths.log_dir).absolute()
    existing = next(p for p in (log_dir, *log_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise VimexpError(f"can't write run directories under {log_dir}: {existing} is read-only or not writable; set "
                          "paths.log_dir=... (or VIMEXP_ROOT) to a writable place")
    for key in (k for k, _ in pairs if "." in k):
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            parent = OmegaConf.select(cfg, ".".join(parts[:depth - 1])) if depth > 1 else cfg
            if not isinstance(parent, DictConfig) or parts[depth - 1] in parent.keys():  # `in` skips ??? values
                continue
            near = difflib.get_close_matches(parts[depth - 1], [str(k) for k in parent], n=1)
            hint = f"did you mean {'.'.join([*parts[:depth - 1], near[0]])}?" if near else \
                f"the keys there are {', '.join(map(str, parent))}"
            raise VimexpError(f"unknown config key {key}: {hint} (to add a new key on purpose: +{key}=...)")


def check_values(cfg):
    """What no option can mean, refused before any data is touched: sizes and counts, and keyword arguments of the
    Trainer, the task and the datamodule that their classes don't take (a `+key=` misspelt)."""
    def positive(key, allow=()):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in allow and not (isinstance(value, int) and value > 0):
            also = f" (or {' or '.join(map(str, allow))})" if allow else ""
            raise VimexpError(f"{key}={value} must be a positive whole number{also}")
    positive("data.batch_size")
    positive("trainer.max_epochs", allow=(-1,))
    positive("trainer.max_steps", allow=(-1,))
    epochs, steps = (OmegaConf.select(cfg, f"trainer.{k}", default=0) for k in ("max_epochs", "max_steps"))
    if epochs == steps == -1:
        raise VimexpError("trainer.max_epochs=-1 trains forever unless trainer.max_steps is set: give one of them")
    workers = OmegaConf.select(cfg, "data.num_workers", default=None)
    if workers is not None and not (isinstance(workers, int) and workers >= 0):
        raise VimexpError(f"data.num_workers={workers} must be 0 or more")
    lr = OmegaConf.select(cfg, "optimizer.lr", default=None)
    if lr is not None and not (isinstance(lr, (int, float)) and lr >= 0):
        raise VimexpError(f"optimizer.lr={lr} must be a number, 0 or more")
    sections = [("trainer", L.Trainer, ("callbacks", "logger", "plugins", "default_root_dir"))] * ("trainer" in cfg)
    sections += [(s, get_class(cfg[s]["_target_"]), ()) for s in ("task", "data") if "_target_" in (cfg.get(s) or {})]
    for section, cls, given in sections:
        params = inspect.signature(cls.__init__).parameters
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        for key in cfg[section]:
            if (key not in params and key != "_target_") or key in given:
                near = difflib.get_close_matches(str(key), [p for p in params if p not in ("self", *given)], n=1)
                raise VimexpError(f"{section}.{key} is not an option of {cls.__name__}"
                                  + (f": did you mean {section}.{near[0]}?" if near else ""))


@contextmanager
def one_line_errors():
    """Print a VimexpError (also one re-raised from a DataLoader worker) as one line and exit with status 2 (a run
    stopped by a signal: 128 + its number)."""
    try:
        yield
    except VimexpError as e:
        print(f"error: {_last_line(e)}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:  # a VimexpError from a worker process comes back as another type, traceback in the text
        if "VimexpError" not in str(e):
            raise
        print(f"error: {_last_line(e)}", file=sys.stderr)
        sys.exit(2)


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1].split("VimexpError: ", 1)[-1]


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


def cli(run_fn, config_name: str):
    """`python -m vimexp.<name>`: config choices checked up front, the Hydra job run, user errors as one line."""
    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg):
        with one_line_errors(), isolated_job():
            check_values(cfg)
            return run_fn(cfg)

    setup()
    if any(a in ("-m", "--multirun") or a.startswith("launcher=") for a in sys.argv[1:]) and \
            not any(a.startswith("sweep_id=") for a in sys.argv[1:]):
        sys.argv.append(f"sweep_id={sweep_id(sys.argv[1:])}")  # an override: pickled with each job, requeues too
    with one_line_errors():
        check_choices(sys.argv[1:])
        preflight(config_name, sys.argv[1:])
    _main()
