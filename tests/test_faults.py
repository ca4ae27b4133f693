"""Faults injected into the real CLI (`python -m vimexp.train` in a subprocess, on the CPU): kill -9 and SIGTERM in
the middle of an epoch then resume, divergence, a user's dataset in the generator's way, a checkpoint write that
fails, an interrupted sweep, two processes on one run directory, an unreadable checkpoint."""
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import data_overrides, run_cli

# 80 training images in batches of 16: 5 steps an epoch, a checkpoint every 2 steps (mid-epoch), loader workers on,
# and everything random that training draws switched on (mixup / cutmix, drop path, EMA)
RUN = ["++model.depth=2", "++model.embed_dim=32", "data.batch_size=16", "data.num_workers=2", "trainer.max_epochs=2",
       "trainer.accelerator=cpu", "logger=csv", "callbacks.step_checkpoint.every_n_train_steps=2",
       "callbacks.step_checkpoint.train_time_interval=null", "task.mixup=0.8", "task.cutmix=1.0",
       "model.drop_path_rate=0.1"]


def start(args, cwd, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "VIMEXP_ROOT": str(cwd)}
    return subprocess.Popen([sys.executable, "-m", "vimexp.train", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def wait_for(path: Path, proc: subprocess.Popen, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def tensors(ckpt: dict) -> dict:
    """Every tensor of a checkpoint that training state depends on: weights, EMA, optimizer state."""
    out = {f"state_dict.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for pid, state in opt["state"].items():
            out.update({f"optimizer{i}.{pid}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def assert_same_training(a: Path, b: Path):
    ca, cb = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False) for d in (a, b))
    ta, tb = tensors(ca), tensors(cb)
    assert ta.keys() == tb.keys() and len(ta) > 20
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
    assert (ca["global_step"], ca["epoch"]) == (cb["global_step"], cb["epoch"]) == (10, 1)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["final"] == rb["final"] and ra["best"] == rb["best"] and ra["epochs"] == rb["epochs"] == 2


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted run: what every interrupted and resumed one must end as, bit for bit."""
    cwd = tmp_path_factory.mktemp("straight")
    out = cwd / "run"
    done = run_cli("train", *data_overrides(tiny_data), *RUN, f"hydra.run.dir={out}", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_kill_9_mid_epoch_then_resume_is_exact(straight, tiny_data, tmp_path):
    """The resumed run ends as the straight one, continues its metrics.csv and its W&B run, and counts the time
    of both parts."""
    out = tmp_path / "run"
    args = [*data_overrides(tiny_data), *RUN, "logger=default", f"hydra.run.dir={out}"]
    proc = start(args, tmp_path)
    wait_for(out / "checkpoints" / "last.ckpt", proc)  # written at step 2 of 5, in the first epoch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["wall_seconds"]
    resumed = run_cli("train", *args, cwd=tmp_path)  # the same command: the run directory's last.ckpt is picked up
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'}" in resumed.stdout
    assert_same_training(straight, out)
    header, *rows = (out / "metrics.csv").read_text().splitlines()
    assert "val/acc1" in header and rows  # appended to, with its earlier rows and columns
    parts = sorted((out / "wandb").glob("offline-run-*"))
    results = json.loads((out / "results.json").read_text())
    assert len(parts) == 2 and {p.name.rsplit("-", 1)[1] for p in parts} == {results["wandb_run_id"]}
    assert 0 < before < results["wall_seconds"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])  # SLURM's, and Ctrl-C
def test_a_stop_signal_writes_a_checkpoint_and_says_how_to_resume(sig, straight, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = start([*data_overrides(tiny_data), *RUN, f"hydra.run.dir={out}"], tmp_path)
    wait_for(out / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, sig)  # to every process of the run, loader workers included, as SLURM and a terminal do
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: stopped by {sig.name} at step") and "resume with: " in message
    assert not (out / "results.json").exists()
    command = shlex.split(message.split("resume with: ", 1)[1])
    assert command[:3] == [Path(sys.executable).name, "-m", "vimexp.train"] and f"hydra.run.dir={out}" in command
    resumed = run_cli("train", *command[3:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(straight, out)


def test_divergence_stops_with_the_step_and_keeps_good_checkpoints(tiny_data, tmp_path):
    out = tmp_path / "run"
    run = run_cli("train", *data_overrides(tiny_data), *RUN, "optimizer.lr=1e6", f"hydra.run.dir={out}", cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: training diverged at step ")
    assert not (out / "results.json").exists()
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        weights = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), ckpt


def test_bad_steps_can_be_let_through(tiny_data, tmp_path):
    """callbacks.divergence.max_skips=K: up to K bad steps pass without an update, then the run stops."""
    out = tmp_path / "run"
    run = run_cli("train", *data_overrides(tiny_data), *RUN, "optimizer.lr=1e6", "callbacks.divergence.max_skips=2",
                  f"hydra.run.dir={out}", cwd=tmp_path)
    assert run.returncode == 2 and "training diverged at step" in run.stderr
    assert run.stderr.count("update skipped") == 2


def test_a_users_directory_is_never_replaced_by_generated_data(tmp_path):
    mine = tmp_path / "my_imagenet"
    (mine / "train" / "n01440764").mkdir(parents=True)
    (mine / "train" / "n01440764" / "a.JPEG").write_bytes(b"not generated")
    run = run_cli("train", f"data.root={mine}", "logger=csv", cwd=tmp_path)  # data=imagenet forgotten
    assert run.returncode == 2
    assert "data=imagenet" in run.stderr and "data.generate=false" in run.stderr
    assert (mine / "train" / "n01440764" / "a.JPEG").read_bytes() == b"not generated"
    assert sorted(p.name for p in mine.rglob("*")) == ["a.JPEG", "n01440764", "train"]


def _limit_file_size(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_checkpoint_write_keeps_the_last_good_one(straight, tiny_data, tmp_path):
    """The OS refuses the write (files capped below a checkpoint's size): one line naming the file and the cause, no
    partial file left, and the last good checkpoint still loads."""
    out = tmp_path / "run"
    good = out / "checkpoints" / "last.ckpt"
    good.parent.mkdir(parents=True)
    good.write_bytes((straight / "checkpoints" / "last.ckpt").read_bytes())
    size = good.stat().st_size
    args = [*data_overrides(tiny_data), *RUN, "trainer.max_epochs=3", f"hydra.run.dir={out}"]
    proc = start(args, tmp_path, preexec_fn=_limit_file_size(size // 2))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: can't write checkpoint {out / 'checkpoints'}") and "File too large" in message
    assert message.endswith("; the last good checkpoint stays")
    assert sorted(p.name for p in good.parent.iterdir()) == ["last.ckpt"]  # no partial temp file
    assert torch.load(good, weights_only=False)["global_step"] == 10  # the good one, untouched


def test_an_interrupted_sweep_continues_where_it_stopped(tiny_data, tmp_path):
    args = ["-m", *data_overrides(tiny_data), *RUN, "seed=0,1"]
    proc = start(args, tmp_path)
    sweep = tmp_path / "logs" / "train" / "multirun"
    deadline = time.time() + 300
    while not list(sweep.glob("*/1_*/checkpoints/last.ckpt")):  # the first job done, the second one under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = next(sweep.glob("*/0_*/results.json"))
    first_written = first.stat().st_mtime_ns
    again = run_cli("train", *args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list(sweep.iterdir())) == 1  # the same sweep directory
    assert f"already finished: {first}" in again.stdout and first.stat().st_mtime_ns == first_written
    second = next(sweep.glob("*/1_*"))
    assert f"resuming from {second / 'checkpoints' / 'last.ckpt'}" in again.stdout
    assert json.loads((second / "results.json").read_text())["epochs"] == 2


def test_a_second_process_on_a_run_directory_is_refused(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [*data_overrides(tiny_data), *RUN, "trainer.max_epochs=20", f"hydra.run.dir={out}"]
    first = start(args, tmp_path)
    try:
        wait_for(out / ".hydra" / "overrides.yaml", first)
        record = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
        second = run_cli("train", *args, "seed=3", cwd=tmp_path)
        assert second.returncode == 2
        assert f"run directory {out} is in use by another process (pid {first.pid})" in second.stderr
        assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == record  # the first run's record kept
        assert "seed=3" not in record["overrides.yaml"].decode()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_an_unreadable_last_checkpoint_names_the_way_out(straight, tiny_data, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "best.ckpt").write_bytes((straight / "checkpoints" / "best.ckpt").read_bytes())
    (out / "checkpoints" / "last.ckpt").write_bytes(b"cut short by a crash")
    run = run_cli("train", *data_overrides(tiny_data), *RUN, f"hydra.run.dir={out}", cwd=tmp_path)
    assert run.returncode == 2
    message = run.stderr.strip().splitlines()[-1]
    assert "last.ckpt can't be read" in message and f"ckpt_path={out / 'checkpoints' / 'best.ckpt'}" in message


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=-4", "data.batch_size=-4 must be a positive whole number"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 trains forever unless trainer.max_steps is set"),
    ("trainer.max_epoch=1", "unknown config key trainer.max_epoch: did you mean trainer.max_epochs?"),
    ("+trainer.max_epoch=1", "trainer.max_epoch is not an option of Trainer: did you mean trainer.max_epochs?"),
    ("data.img_size=30", "img_size 30 is not covered by patches of 8 px every 8 px"),
    ("data.num_workers=-1", "data.num_workers=-1 must be 0 or more"),
    ("data.re_mode=noise", "data.re_mode=noise is not an erasing mode: use one of pixel, rand, const"),
    ("trainer.precision=bf17", "trainer.precision=bf17 is not a precision Lightning knows: use one of "),
])
def test_bad_values_fail_in_one_line_before_any_data(override, message, tmp_path):
    run = run_cli("train", override, "logger=csv", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), run.stderr[-2000:]
    assert not (tmp_path / "data").exists()  # refused before the built-in data was generated


def test_a_bad_value_in_a_later_sweep_job_is_refused_before_the_first_job_starts(tmp_path):
    run = run_cli("train", "-m", "seed=0,1", "data.batch_size=16,-4", "logger=csv", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: sweep job #1 of 4 (seed=0 data.batch_size=-4): data.batch_size=-4 must be a positive whole number; "
        "no job was started"), run.stderr
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("logs/**/.hydra"))


@pytest.mark.parametrize("override, says", [("trainer=gpu", "(accelerator=gpu, devices=1, precision="),
                                            ("trainer.accelerator=tpux", "(accelerator=tpux, devices=1")])
def test_trainer_settings_lightning_refuses_fail_in_one_line(override, says, tiny_data, tmp_path):
    """What only Lightning can judge (a GPU trainer on a machine without one, an accelerator it doesn't know): one
    line naming the settings, and no run directory left."""
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = run_cli("train", *data_overrides(tiny_data), *(a for a in RUN if not a.startswith("trainer.accelerator")),
                  override, cwd=tmp_path)
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: Lightning refused the trainer settings {says}") and \
        line.endswith("Fix the trainer.* override (trainer=cpu where there is no GPU)"), run.stderr[-2000:]
    assert not list((tmp_path / "logs").glob("*/*/*")), "a run directory was left"


def test_eval_without_a_checkpoint_says_how_to_give_one(tmp_path):
    run = run_cli("eval", "logger=csv", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: ckpt_path is missing: python -m vimexp.eval ckpt_path=<run dir>/checkpoints/best.ckpt"), run.stderr


def test_a_read_only_log_directory_fails_in_one_line(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"can't mount a read-only file system here: {mounted.stderr.decode().strip()}")
    try:
        run = run_cli("train", f"paths.log_dir={readonly / 'logs'}", "logger=csv", cwd=tmp_path)
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: can't write run directories under {readonly / 'logs'}: {readonly} is read-only or not writable; "
        "set paths.log_dir=... (or VIMEXP_ROOT) to a writable place")


@pytest.mark.parametrize("args", [["hydra.run.dir={}"], ["-m", "seed=0,1", "hydra.sweep.dir={}"]])
def test_a_run_directory_that_cannot_be_made_fails_in_one_line(args, tmp_path):
    """hydra.run.dir / hydra.sweep.dir under a file (or a read-only place): Hydra makes it before any job code runs,
    so it is checked first."""
    (tmp_path / "a_file").write_text("")
    where = tmp_path / "a_file" / "run"
    run = run_cli("train", *(a.format(where) for a in args), "logger=csv", cwd=tmp_path)
    assert run.returncode == 2
    key = args[-1].split("=")[0]
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: can't make run directories at {where}: {tmp_path / 'a_file'} is a file, not a directory; "
        f"set {key}=... to a writable place"), run.stderr


def test_a_second_ctrl_c_stops_at_once_with_the_resume_command(tmp_path):
    """CheckpointOnSignal's handler, as the OS calls it: the first Ctrl-C is noted (the step finishes and writes a
    checkpoint), a second one stops the run where it is with status 130, naming the checkpoint kept and the resume
    command (not Lightning's KeyboardInterrupt, which exits with 1 and no word on resuming)."""
    from types import SimpleNamespace
    from vimexp.callbacks import CheckpointOnSignal, RunInterrupted
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    callback = CheckpointOnSignal("python -m vimexp.train hydra.run.dir=x")
    callback._trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=12,
                                        _signal_connector=SimpleNamespace(received_sigterm=False))
    callback._handle(signal.SIGINT, None)
    assert callback.received == signal.SIGINT
    with pytest.raises(RunInterrupted) as stopped:
        callback._handle(signal.SIGINT, None)
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == (f"stopped at once by a second Ctrl-C at step 12; {tmp_path}/checkpoints/last.ckpt "
                                  "holds its last checkpoint; resume with: python -m vimexp.train hydra.run.dir=x")
