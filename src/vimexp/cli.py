"""The command line of every entry point (`python -m vimexp.train|eval|bench`): config choices checked up front, one
Hydra job per run (isolated from the next job of a multirun), and user errors printed as one line."""
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

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
            return run_fn(cfg)

    setup()
    with one_line_errors():
        check_choices(sys.argv[1:])
    _main()
