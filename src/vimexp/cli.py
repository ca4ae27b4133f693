"""The command line of every entry point (`python -m vimexp.train|eval|bench`): `--help`, config choices checked up
front, one Hydra job per run (isolated from the next job of a multirun), user errors printed as one line, and no run
directory left by a run that failed before it saved anything.

torch, Lightning and Hydra are imported inside the functions that use them: `--help` and `python -m vimexp.tables`
import this module and answer in well under a second."""
import difflib
import hashlib
import inspect
import os
import re
import shlex
import shutil
import signal
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from vimexp import VimexpError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

GROUPS = {  # conf/<group>/ in --help order, one line each (tests/test_console.py keeps this in step with conf/)
    "experiment": "the run: a paper row or a built-in job; sets the data, model and recipe",
    "ablation": "a design variant of Tables 4-5 over the experiment: bidirectional scheme, class token",
    "recipe": "a recipe variant over the experiment (Appendix B's segmentation and detection settings)",
    "model": "the backbone and its size: Vim, DeiT, Hier-Vim, Swin (the _nano ones: tiny, for CPU runs)",
    "data": "the dataset and its pipeline (the builtin ones: generated here, no download)",
    "task": "what is learned: classification, segmentation (UperNet, Segmenter) or detection",
    "optimizer": "AdamW, with or without layer-wise lr decay",
    "scheduler": "the lr schedule, with warmup",
    "trainer": "Lightning's Trainer: device, precision, epochs, DDP",
    "callbacks": "checkpoints (best, last, every 10 minutes), the stop on divergence, the progress bar",
    "logger": "where metrics go: metrics.csv and W&B (offline unless WANDB_API_KEY is set)",
    "launcher": "where the jobs run: here, or on SLURM",
    "debug": "quick checks: one batch each (fdr), or a few batches of 2 epochs on the CPU (limit)",
    "bench": "the benchmark: Figures 1, 3-4, training speed, the mixer kernels, DDP scaling, a plot",
    "paths": "where data and run directories go (under VIMEXP_ROOT, default the current directory)",
}
HIDDEN_GROUPS = ("hydra",)  # Hydra's own settings: --hydra-help

COMMANDS = {  # what each command does, and examples whose choices tests/test_console.py checks
    "train": ("Train a model. Each run gets a directory, logs/<task_name>/<run_name>/<time>/, for its checkpoints, "
              "metrics.csv and results.json.",
              ["python -m vimexp.train                                    # a small Vim on built-in data: CPU, minutes",
               "python -m vimexp.train experiment=imagenet_vim_ti data.root=/data/imagenet trainer=gpu",
               "python -m vimexp.train -m ablation=bidir_none,bidir_ssm   # a sweep: one run each",
               "python -m vimexp.train debug=fdr                          # one batch of each: does it all run?"]),
    "eval": ("Evaluate a checkpoint: a vimexp .ckpt (its run's config comes with it) or an official .pth; writes "
             "results.json like a training run.",
             ["python -m vimexp.eval ckpt_path=logs/train/builtin/<time>/checkpoints/best.ckpt",
              "python -m vimexp.eval ckpt_path=vim_s_midclstok_80p5acc.pth experiment=imagenet_vim_s "
              "data.root=/data/imagenet",
              "python -m vimexp.eval ckpt_path=<file> split=val data.num_workers=4"]),
    "bench": ("Benchmark backbones and kernels: throughput and peak memory; results.json (and CSV, plots) in the run "
              "directory.",
              ["python -m vimexp.bench bench=fig1                # Vim-Ti vs DeiT-Ti inference vs resolution (GPU)",
               "python -m vimexp.bench bench=mixer bench.sweep=true",
               "python -m vimexp.bench bench=ddp bench.devices=2",
               "python -m vimexp.bench bench=loader bench.workers=[8,14]     # the data loader alone",
               "python -m vimexp.bench bench=speedup out_dir=experiments/results/fused_scan/h200"]),
}


def command_groups(config_name: str) -> list[tuple[str, str | None]]:
    """The config groups conf/<config_name>.yaml composes, with their defaults, in --help order."""
    import yaml  # PyYAML, light (omegaconf's own parser)
    defaults = yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text()).get("defaults", [])
    chosen = dict(next(iter(d.items())) for d in defaults if isinstance(d, dict))
    return [(g, chosen[g]) for g in GROUPS if g in chosen]


def help_page(config_name: str) -> str:
    """`python -m vimexp.<config_name> --help`: what the command does, its config groups with their choices, examples."""
    about, examples = COMMANDS[config_name]
    lines = [f"usage: python -m vimexp.{config_name} [-m] [group=choice ...] [key=value ...]", "",
             *textwrap.wrap(about, 110), "", "config groups (group=choice; * the default, none where unmarked):"]
    for group, default in command_groups(config_name):
        choices = ", ".join(c + "*" * (c == default) for c in group_choices(group))
        lines += [f"  {group:<11} {GROUPS[group]}",
                  *textwrap.wrap(choices, 110, initial_indent=" " * 14, subsequent_indent=" " * 14)]
    lines += ["", "examples:", *(f"  {e}" for e in examples), "",
              "Any key of the config takes a value too (--cfg job prints them, composed); -m runs one job per value",
              "of a,b,...; --hydra-help lists Hydra's own options."]
    return "\n".join(lines)


def exit_on_help(config_name: str, module: str = "__main__"):
    """`--help` / `-h` on the command line of `python -m vimexp.<config_name>`: its page, and exit. Called before torch
    and Lightning are imported (`module` is the caller's __name__: nothing happens on an import)."""
    if module == "__main__" and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(help_page(config_name))
        sys.exit(0)


def setup():
    """What a Hydra run of vimexp needs before composing: the config resolvers, and Lightning's DDP launcher told how
    to start this job's child processes. Idempotent; the CLI calls it, and so can code composing configs itself."""
    from omegaconf import OmegaConf
    OmegaConf.register_new_resolver("wandb_offline", lambda: not os.environ.get("WANDB_API_KEY"), replace=True)
    OmegaConf.register_new_resolver("name_join", lambda *parts: "-".join(str(p) for p in parts if p), replace=True)
    OmegaConf.register_new_resolver("tags_with", lambda tags, *extra: [*tags, *(e for e in extra if e)], replace=True)
    from lightning.pytorch.strategies.launchers import subprocess_script
    subprocess_script._hydra_subprocess_cmd = ddp_child_command  # Lightning looks both up here at launch
    subprocess_script._launch_process_observer = watch_ddp_children


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
    from hydra.core.hydra_config import HydraConfig
    hydra_cfg = HydraConfig.get()
    command = [sys.executable, "-m", f"vimexp.{hydra_cfg.job.config_name}", *hydra_cfg.overrides.task,
               f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', "hydra.output_subdir=null",
               f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}"]
    return command, hydra_cfg.runtime.cwd


PARENT_ENV = "VIMEXP_DDP_PARENT"  # set by build_trainer in a first process that starts its DDP children itself


def die_with_parent():
    """In a DDP child that the first process started (its pid in VIMEXP_DDP_PARENT): be killed (SIGKILL) when that
    process ends, however it ends. Killed outright (say by the kernel's out-of-memory killer), it would otherwise leave
    the others in a collective until NCCL's timeout, holding their GPUs. Linux only (prctl)."""
    if os.environ.get(PARENT_ENV) != str(os.getppid()) or not sys.platform.startswith("linux"):
        return  # not such a child (or its parent is already gone: then its first collective fails)
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_RUN_ENDING = threading.Lock()  # held by whichever of the main thread and the watch ends a DDP run first


def end_the_run_s_processes() -> None:
    """In the first process of a DDP run it started itself: SIGKILL the run's other processes, its ranks and their
    loader workers, orphans too, and wait for them to go, so that none writes past the run's last line (CI saw a
    frozen rank's traceback land after it) and none outlives it. They are found by this process's pid in their
    VIMEXP_DDP_PARENT, read from /proc (Linux, where DDP runs; psutil is not a dependency). A second caller blocks
    while the first ends the process. A no-op elsewhere."""
    if os.environ.get(PARENT_ENV) != str(os.getpid()) or not Path("/proc/self/environ").is_file():
        return
    _RUN_ENDING.acquire()
    mark = f"{PARENT_ENV}={os.getpid()}\0".encode()
    killed = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(proc)
        except OSError:  # gone meanwhile, or another user's
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_running, killed)):
        time.sleep(0.05)


def _running(proc: Path) -> bool:
    """Whether the process of /proc/<pid> exists and has not ended (a zombie waits only for its parent to reap it)."""
    try:
        return (proc / "stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


WHERE_IT_RUNS = ("ckpt_path=", "hydra.run.dir=", "sweep_id=")  # overrides that say where a run goes, not what it is


def run_overrides(overrides=None) -> list[str]:
    """A run's overrides (this job's by default) less those that only say where it runs or resumes from."""
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig
        overrides = HydraConfig.get().overrides.task
    return [o for o in overrides if not o.startswith(WHERE_IT_RUNS)]


def resume_command(out: Path, overrides=None) -> str:
    """The command that continues a run (this job's by default, else the one `overrides` started) in `out`."""
    return shlex.join([Path(sys.executable).name, "-m", "vimexp.train", *run_overrides(overrides),
                       f"hydra.run.dir={out}"])


def save_run_config(cfg, out: Path) -> None:
    """The run's record in its directory, .hydra/config.yaml (as composed) and .hydra/overrides.yaml, written by the
    process that holds the directory: Hydra's own (hydra.output_subdir, off), written before any lock, let a second
    run that was then refused overwrite a running one's."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    record = out / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (record / "config.yaml").write_text(OmegaConf.to_yaml(run))
    (record / "overrides.yaml").write_text(OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))


def lost_a_process(world: int, what: str, out: Path, resume: str) -> str:
    """The one line for a DDP run one of whose processes ended or stopped answering (`what`, e.g. "ended (rank 1,
    killed by SIGKILL)"): what happened, what was kept, how to resume."""
    return f"another process of this {world}-process run {what}; {checkpoint_kept(out)}; resume with: {resume}"


def checkpoint_kept(out: Path) -> str:
    """What a run stopped before its end leaves to resume from, for its last line."""
    last = out / "checkpoints" / "last.ckpt"
    return f"{last} holds its last checkpoint" if last.is_file() else "no checkpoint was written yet"


def watch_ddp_children(children: list) -> None:
    """Lightning's watch over the DDP processes it starts, saying how to resume: one that ends with an error (killed,
    out of memory) takes the run down within a second, in one line, rather than leave the others in a collective
    until its timeout. One that ends as every rank does when the run stops in order (a one-line error, a stop
    signal) gets 30 s for this process to make the same stop. Lightning's own watch kills without a word on
    resuming."""
    from hydra.core.hydra_config import HydraConfig
    out = Path(HydraConfig.get().runtime.output_dir)
    resume = resume_command(out)
    orderly = {2, *(128 + s for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT))}
    first_seen = {}

    def watch():
        while True:
            time.sleep(1)
            codes = [child.poll() for child in children]
            if all(code == 0 for code in codes):
                return
            failed = [(rank, code) for rank, code in enumerate(codes, start=1) if code]
            if not failed:
                continue
            rank, code = failed[0]
            if code in orderly and time.time() - first_seen.setdefault(rank, time.time()) < 30:
                continue
            if _RUN_ENDING.locked():  # the main thread is ending the run, with its own line
                return
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            line = lost_a_process(len(children) + 1, f"ended (rank {rank}, {how})", out, resume)
            end_the_run_s_processes()
            print(f"error: {line}", file=sys.stderr, flush=True)
            os._exit(2)  # at once, whatever the main thread is blocked in
    threading.Thread(target=watch, daemon=True, name="vimexp-ddp-watch").start()


def group_choices(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml); files starting with `_` are bases, not choices."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def is_group(key: str) -> bool:
    """Whether a command-line key names a config group (conf/<key>/), not a config key."""
    return "." not in key and (CONF_DIR / key).is_dir()


def check_choices(argv: list[str]):
    """Unknown config-group options (experiment=foo, ablation=a,b, ...) fail in one line, naming the nearest choice
    and listing them all."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or not is_group(key) or "(" in value or value in ("null", ""):
            continue
        choices = group_choices(key)
        for option in value.split(","):
            if option not in choices and option != "null":  # null: none (a sweep's row without one)
                near = difflib.get_close_matches(option, choices, n=1)
                hint = f" (did you mean {key}={near[0]}?)" if near else ""
                raise VimexpError(f"unknown {key} {option!r}{hint}: choose one of {', '.join(choices)}")


def preflight(config_name: str, argv: list[str]):
    """Before Hydra starts: a key that isn't in the config fails in one line naming the nearest one (Hydra's own hint,
    to add it with +, leads to a traceback later), and so do a log or run directory that can't be made and, under
    a sweep, any job's bad value. Composes the config once with the command line's group choices and paths."""
    from hydra import compose, initialize_config_dir
    pairs = [a.split("=", 1) for a in argv if "=" in a and not a.startswith(("+", "~", "-", "hydra."))]
    choices = [f"{k}={v.split(',')[0]}" for k, v in pairs if is_group(k) or k.startswith("paths.")]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=choices)
    check_writable(Path(cfg.paths.log_dir), "paths.log_dir=... (or VIMEXP_ROOT)")
    for key, _, value in (a.partition("=") for a in argv):  # Hydra makes these before any job code runs
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "$" not in value:
            check_writable(Path(value), f"{key}=...")
    groups = [g for g, _ in command_groups(config_name)]
    for key in (k for k, _ in pairs if "/" not in k and not is_group(k)):  # a/b: Hydra's groups
        _check_key(cfg, key, groups)
    if is_multirun(argv):
        check_sweep_jobs(config_name, [a for a in argv if ("=" in a or a.startswith("~"))
                                       and not a.startswith(("-", "hydra."))])


def check_writable(path: Path, setting: str):
    """Directories can be made at `path`: its nearest existing ancestor is a writable directory."""
    path = path.absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise VimexpError(f"can't make run directories at {path}: {existing} is a file, not a directory; set {setting} "
                          "to a writable place")
    if not os.access(existing, os.W_OK):
        raise VimexpError(f"can't write run directories under {path}: {existing} is read-only or not writable; set "
                          f"{setting} to a writable place")


def is_multirun(argv: list[str]) -> bool:
    """-m, or a launcher (conf/launcher/: they submit as a multirun even without -m)."""
    return any(a in ("-m", "--multirun") or (a.startswith("launcher=") and a != "launcher=null") for a in argv)


def check_sweep_jobs(config_name: str, overrides: list[str]):
    """Every job of a sweep gets check_values before the first starts: a bad value in the last job must not wait for
    the others to train. Jobs numbered as Hydra numbers them (#0 first)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # Hydra's own expansion into jobs
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:  # sweep syntax Hydra refuses (or its basic sweeper can't expand): Hydra says so when it starts
        return
    swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for n, job in enumerate(jobs):
            try:
                cfg = compose(config_name, overrides=job)
            except Exception:  # what Hydra itself refuses, it reports in its own words when it starts
                return
            try:
                check_values(cfg)
            except VimexpError as e:
                which = " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept) or " ".join(job)
                raise VimexpError(f"sweep job #{n} of {len(jobs)} ({which}): {e}; no job was started") from None


def _check_key(cfg, key: str, groups: list[str]):
    """`key` names a node of `cfg`, or fails naming the nearest one (a config group counts at the top level)."""
    from omegaconf import DictConfig, OmegaConf
    parts = key.split(".")
    for depth in range(1, len(parts) + 1):
        parent = OmegaConf.select(cfg, ".".join(parts[:depth - 1])) if depth > 1 else cfg
        if not isinstance(parent, DictConfig) or parts[depth - 1] in parent.keys():  # `in` skips ??? values
            continue
        names = [str(k) for k in parent] + (groups if depth == 1 else [])
        near = difflib.get_close_matches(parts[depth - 1], names, n=1)
        hint = f"did you mean {'.'.join([*parts[:depth - 1], near[0]])}?" if near else \
            f"the keys there are {', '.join(map(str, parent))}"
        what = "config group or key" if depth == 1 == len(parts) else "config key"
        raise VimexpError(f"unknown {what} {key}: {hint} (to add a new key on purpose: +{key}=...)")


def check_values(cfg):
    """What no option can mean, refused before any data is touched: sizes and counts, and keyword arguments of the
    Trainer, the task and the datamodule that their classes don't take (a `+key=` misspelt)."""
    import lightning as L
    from hydra.utils import get_class
    from omegaconf import OmegaConf

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
    erase_mode = OmegaConf.select(cfg, "data.re_mode", default=None)
    if erase_mode is not None:
        from vimexp.data.imagefolder import check_erase_mode
        check_erase_mode(erase_mode)
    lr = OmegaConf.select(cfg, "optimizer.lr", default=None)
    if lr is not None and not (isinstance(lr, (int, float)) and lr >= 0):
        raise VimexpError(f"optimizer.lr={lr} must be a number, 0 or more")
    precision = OmegaConf.select(cfg, "trainer.precision", default=None)
    if precision is not None:
        from typing import get_args
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR
        known = [*get_args(_PRECISION_INPUT_STR), *get_args(_PRECISION_INPUT_INT)]
        if precision not in known and str(precision) not in known:
            raise VimexpError(f"trainer.precision={precision} is not a precision Lightning knows: use one of "
                              + ", ".join(get_args(_PRECISION_INPUT_STR)))
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
    import torch
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


# What every run writes as it starts, before it has anything to show: Hydra's record and log, the run lock, the loggers'
# headers and W&B's offline run. Only a failed run's directory holding nothing else (checkpoints/ and previews/ empty,
# metrics.csv without a row) is removed: anything more, a file vimexp doesn't write included, may be the user's and
# keeps the whole directory, as does a lock another process holds.
STARTUP_FILES = re.compile(r"\.hydra|run(_rank\d+)?\.log|\.lock|\.lock\.pid|hparams\.yaml|wandb")


def holds_nothing(run_dir: Path) -> bool:
    """Whether a run directory holds only what a run writes as it starts (STARTUP_FILES)."""
    for p in run_dir.iterdir():
        if p.name == "metrics.csv" and p.is_file():
            if len(p.read_text(errors="replace").splitlines()) > 1:
                return False
        elif p.name in ("checkpoints", "previews") and p.is_dir():
            if any(p.iterdir()):
                return False
        elif not STARTUP_FILES.fullmatch(p.name):
            return False
    return True


def discard_if_empty(run_dir: Path):
    """Remove a failed run's directory if it holds nothing, unless another process holds its lock (a second run refused
    there fails while the first one goes on)."""
    from filelock import FileLock, Timeout
    if not run_dir.is_dir() or not holds_nothing(run_dir):
        return
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return
    try:
        shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        lock.release()


@contextmanager
def no_empty_run_dir():
    """A run that fails (an error, a bad value, Ctrl-C) before it saved anything leaves no run directory, and with it
    no W&B offline run; its console said what went wrong. Rank 0 decides: DDP's other ranks share the directory."""
    try:
        yield
    except BaseException as e:
        from hydra.core.hydra_config import HydraConfig
        from lightning.pytorch.utilities import rank_zero_only
        if not (isinstance(e, SystemExit) and e.code in (0, None)) and rank_zero_only.rank == 0:
            discard_if_empty(Path(HydraConfig.get().runtime.output_dir))
        raise


def cli(run_fn, config_name: str):
    """`python -m vimexp.<name>`: config choices checked up front, the Hydra job run, user errors as one line."""
    die_with_parent()
    exit_on_help(config_name)
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _main(cfg):
        with one_line_errors(), no_empty_run_dir(), isolated_job():  # W&B finished before its directory is judged
            check_values(cfg)
            return run_fn(cfg)

    setup()
    if is_multirun(sys.argv[1:]) and \
            not any(a.startswith("sweep_id=") for a in sys.argv[1:]):
        sys.argv.append(f"sweep_id={sweep_id(sys.argv[1:])}")  # an override: pickled with each job, requeues too
    with one_line_errors():
        check_choices(sys.argv[1:])
        preflight(config_name, sys.argv[1:])
    _main()
