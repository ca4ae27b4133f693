"""What the console says: `--help` per command (its config groups, at once, before torch is imported), the nearest
choice for a misspelt one, and no run directory (nor W&B run) left by a run that failed before it saved anything.
The default run's console (the results line last, no Lightning tips) is checked on test_train.py's CLI run."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from filelock import FileLock

from conftest import TINY_RUN, data_overrides, run_cli
from vimexp.cli import CONF_DIR, COMMANDS, GROUPS, HIDDEN_GROUPS, check_choices, command_groups, holds_nothing, \
    discard_if_empty, preflight

# runs a command's module as `python -m` does, then reports what the help page cost in imports
HELP_AND_IMPORTS = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
print("heavy imports:", sorted(m for m in ("torch", "lightning", "hydra", "wandb") if m in sys.modules))
"""


@pytest.mark.parametrize("command", ["train", "eval", "tables"])
def test_help_lists_the_commands_groups_before_torch_is_imported(command, tmp_path):
    done = subprocess.run([sys.executable, "-c", HELP_AND_IMPORTS, f"vimexp.{command}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "heavy imports: []"
    assert f"python -m vimexp.{command}" in done.stdout
    for group, _ in command_groups(command) if command in COMMANDS else ():
        assert f"\n  {group:<11} {GROUPS[group]}\n" in done.stdout, group
    if command == "train":
        assert "debug" in done.stdout and "bench " not in done.stdout and "vim_nano*" in done.stdout


def test_bench_help_lists_only_its_groups(tmp_path):
    done = run_cli("bench", "-h", cwd=tmp_path)  # vimexp.bench imports torch itself, before the help is answered
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\n  bench " in done.stdout and "fig1*" in done.stdout and "\n  experiment " not in done.stdout
    assert not (tmp_path / "logs").exists()


def test_every_config_group_has_a_description():
    assert set(GROUPS) | set(HIDDEN_GROUPS) == {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_examples_are_valid_commands(command):
    for example in COMMANDS[command][1]:
        args = [a for a in shlex.split(example.split("#")[0])[3:] if a != "-m"]
        check_choices(args)
        preflight(command, args)


@pytest.mark.parametrize("arg, nearest", [("model=vim_tiny", "(did you mean model=vim_ti?): choose one of"),
                                          ("ablation=cls_head,bidir_nne", "(did you mean ablation=bidir_none?)"),
                                          ("experimnt=builtin", "did you mean experiment?")])
def test_a_misspelt_group_or_choice_gets_the_nearest(arg, nearest, tmp_path):
    run = run_cli("train", arg, cwd=tmp_path)
    assert run.returncode == 2
    assert nearest in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]


def test_a_bad_value_leaves_no_run_directory(tmp_path):
    """Refused inside the Hydra job, after its run directory was made."""
    run = run_cli("train", "optimizer.lr=-1", cwd=tmp_path)
    assert run.returncode == 2 and "optimizer.lr=-1 must be a number" in run.stderr
    assert (tmp_path / "logs" / "train").is_dir() and not list(tmp_path.glob("logs/train/*/*"))


def test_ctrl_c_before_any_checkpoint_leaves_no_run_directory(tiny_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "VIMEXP_ROOT": str(tmp_path)}
    args = [*data_overrides(tiny_data), *TINY_RUN, "logger=default", f"hydra.run.dir={out}"]
    # Ctrl-C as a terminal delivers it: SIGINT not ignored, even where this test runs in a background job, whose
    # processes inherit SIGINT ignored (then Python raises no KeyboardInterrupt, and the run would go on)
    proc = subprocess.Popen([sys.executable, "-m", "vimexp.train", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / ".lock.pid").exists():  # the run has its directory and starts building the model
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-3000:]
    assert not out.exists(), (sorted(p.name for p in out.rglob("*")), stderr[-2000:])


def _started_run(run_dir):
    """What any run leaves before it has anything to show."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "wandb" / "offline-run-1").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    for name in ("run.log", ".lock", "hparams.yaml"):
        (run_dir / name).write_text("")
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n")
    return run_dir


@pytest.mark.parametrize("worth_keeping", [None, "checkpoints/last.ckpt", "results.json", "previews/val_step0.png",
                                           "notes.txt", "metrics.csv"])
def test_only_a_run_directory_holding_nothing_is_removed(worth_keeping, tmp_path):
    run_dir = _started_run(tmp_path / "run")
    if worth_keeping == "metrics.csv":
        (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,9,1.5\n")  # a row
    elif worth_keeping:
        (run_dir / worth_keeping).parent.mkdir(exist_ok=True)
        (run_dir / worth_keeping).write_text("x")
    assert holds_nothing(run_dir) == (worth_keeping is None)
    discard_if_empty(run_dir)
    assert run_dir.exists() == (worth_keeping is not None)


def test_a_run_directory_in_use_is_never_removed(tmp_path):
    run_dir = _started_run(tmp_path / "run")
    with FileLock(run_dir / ".lock"):  # another run's, as a second process aimed at it fails
        discard_if_empty(run_dir)
    assert (run_dir / ".hydra" / "config.yaml").is_file()
