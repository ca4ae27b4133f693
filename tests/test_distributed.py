"""Scale-out: DDP over two gloo processes on the CPU (one of them killed, then resumed; the fault tests also over NCCL
on two GPUs), DDP inside Hydra multiruns,
submitit's local launcher, the SLURM presets and requeue into the same run directory."""
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf
from timm.data import create_transform

from conftest import TINY_RUN, compose_cfg, data_overrides, run_cli
from vimexp.data.imagefolder import CheckedImageFolder
from vimexp.data.sampling import EpochIndexSampler, GroupedRepeatSampler
from vimexp.build import build_trainer

# no randomness inside a step (mixup, drop path), so that the processes can't differ but by float rounding
DETERMINISTIC = ["logger=csv", "trainer.accelerator=cpu", "task.mixup=0", "task.cutmix=0", "++model.drop_path_rate=0",
                 "optimizer.lr=0.05", "trainer.max_epochs=1"]
DDP2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
# the fault tests again over NCCL on two GPUs (make gpu-test), with deterministic kernels for the bit-for-bit resume
ON_TWO_GPUS = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2", "model.kernel=torch",
               "trainer.deterministic=true"]
BACKENDS = [pytest.param(DDP2, id="gloo"),
            pytest.param(ON_TWO_GPUS, id="nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
                torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")])]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def _train_in(run_dir: Path, *args, cwd):
    run = run_cli("train", *args, f"hydra.run.dir={run_dir}", cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_ddp_processes_train_as_one_with_the_same_global_batch(tiny_data, tmp_path):
    common = [*data_overrides(tiny_data), *TINY_RUN, *DETERMINISTIC]  # global batch 16: 5 steps over 80 images
    _train_in(tmp_path / "one", *common, cwd=tmp_path)
    _train_in(tmp_path / "two", *common, *DDP2, cwd=tmp_path)
    _train_in(tmp_path / "other_batches", *common, "seed=1", cwd=tmp_path)  # the control: another data order
    one, two, other = (_weights(tmp_path / d) for d in ("one", "two", "other_batches"))
    assert json.loads((tmp_path / "two/results.json").read_text())["world_size"] == 2
    assert one.keys() == two.keys() and any(k.startswith("ema.") for k in one)
    gaps = {k: (two[k] - one[k]).abs().max().item() for k in one}
    control = max((other[k] - one[k]).abs().max().item() for k in one if k.startswith("model."))
    assert max(gaps.values()) < 2e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    assert control > 1e-3  # the weights moved, and which images make a batch matters


def test_ddp_inside_a_multirun_gives_each_job_one_directory_and_one_wandb_run(tiny_data, tmp_path):
    run = run_cli("train", "-m", *data_overrides(tiny_data), *TINY_RUN, *DDP2, "debug=limit", "logger=default",
                  "seed=1,2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("results in") == 2  # the sweep ran once, not again from the second process
    sweeps = list((tmp_path / "logs" / "debug" / "multirun").iterdir())
    assert len(sweeps) == 1 and sorted(p.name for p in (tmp_path / "logs" / "debug").iterdir()) == ["multirun"]
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "results.json").read_text())["world_size"] == 2
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "run_rank1.log").is_file()
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1


def _requeue(submission_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run a job's pickled submission again, as submitit's sbatch script does after a preemption or time-limit requeue."""
    job_id = submission_dir.name
    env = {**os.environ, "WANDB_MODE": "offline", "SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": job_id,
           "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}
    return subprocess.run([sys.executable, "-m", "submitit.core._submit", str(submission_dir)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_submitit_local_multirun_and_a_requeued_job_resumes_in_its_directory(tiny_data, tmp_path):
    pytest.importorskip("submitit")  # the dev extra's (a GPU node with the runtime only lacks it)
    run = run_cli("train", "-m", *data_overrides(tiny_data), *TINY_RUN, "debug=limit", "hydra/launcher=submitit_local",
                  "hydra.launcher.timeout_min=10", "seed=1,2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = next((tmp_path / "logs" / "debug" / "multirun").iterdir())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "results.json").read_text())["epochs"] == 2
        assert (job / "checkpoints" / "last.ckpt").is_file()
    # the requeued job finds its directory again (the timestamp in it included) and resumes from its last.ckpt
    (jobs[0] / "results.json").unlink()  # as if preempted before the end: a finished job would be skipped
    first = min((p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    again = _requeue(first, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {jobs[0] / 'checkpoints' / 'last.ckpt'}" in again.stdout
    assert sorted(sweep.iterdir()) == sorted([*jobs, sweep / ".submitit", sweep / "multirun.yaml"])
    assert json.loads((jobs[0] / "results.json").read_text())["epochs"] == 2  # the history came back with it


def test_slurm_preset_ties_lightning_to_the_submitit_resources(monkeypatch, tmp_path):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "is srun here?": it is not
    cfg = compose_cfg(["experiment=imagenet_vim_ti", "data.root=/imagenet", "launcher=slurm_2x8gpu",
                       "hydra.launcher.partition=gpu"], tmp_path)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and cfg.hydra.mode.name == "MULTIRUN"
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (8, 2)
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
    assert cfg.data.batch_size == 1024  # global: 64 per process on 16 GPUs, the lr unchanged
    # the sbatch script submitit writes from these parameters (the key mapping of hydra-submitit-launcher's launch())
    params = {k: v for k, v in OmegaConf.to_container(launcher, resolve=False).items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout") and v is not None}
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}
    params["name"] = "train"
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm", slurm_max_num_timeout=launcher.max_num_timeout)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m vimexp.train", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=gpu",
                 "--signal=USR2@120", "--time=2880"):
        assert f"#SBATCH {line}" in sbatch, line


def test_under_slurm_lightning_leaves_requeue_to_submitit(monkeypatch, tmp_path):
    for key, value in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_JOB_NAME="vimexp",
                           SLURM_JOB_ID="42", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                           SLURM_NODELIST="localhost").items():
        monkeypatch.setenv(key, value)
    trainer = build_trainer(compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"], tmp_path))
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False


def test_repeated_augmentation_augments_each_copy_differently_and_reproducibly(tiny_data):
    dataset = CheckedImageFolder(tiny_data / "train", create_transform(32, is_training=True, hflip=0.5), seed=0)

    def draw(rank):  # DeiT's repeated augmentation over 2 processes: each image 3 times, spread over the ranks
        sampler = GroupedRepeatSampler(dataset, 2, 8, 8 * rank, 8)
        return [(key[0], dataset[key][0]) for key in EpochIndexSampler(sampler)]

    draws = draw(0) + draw(1)
    copies = {}
    for index, image in draws:
        copies.setdefault(index, []).append(image)
    repeated = [c for c in copies.values() if len(c) > 1]  # (an epoch keeps its length: some copies are left out)
    assert len(repeated) > len(copies) // 4
    for c in repeated:
        assert all(not torch.equal(a, b) for i, a in enumerate(c) for b in c[i + 1:])
    assert all(torch.equal(a[1], b[1]) for a, b in zip(draws, draw(0) + draw(1)))


@pytest.mark.parametrize("ddp", BACKENDS)
def test_a_killed_rank_fails_the_run_in_one_line_and_the_same_command_resumes_it_exactly(ddp, tiny_data, tmp_path):
    """kill -9 on one process of a 2-process DDP run, mid-epoch after a checkpoint: the other one stops within
    seconds, not at a collective's timeout, in one line naming the resume command, with no process left behind;
    that command ends where an uninterrupted 2-process run does, bit for bit (weights, EMA, optimizer state)."""
    from test_faults import RUN, assert_same_training, start, wait_for
    args = [*data_overrides(tiny_data), *(a for a in RUN if not a.startswith("trainer.accelerator")), *ddp]
    _train_in(tmp_path / "straight", *args, cwd=tmp_path)
    out = tmp_path / "run"
    proc = start([*args, f"hydra.run.dir={out}"], tmp_path)
    wait_for(out / "checkpoints" / "last.ckpt", proc)
    rank1 = next(int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                 if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    assert f"VIMEXP_DDP_PARENT={proc.pid}\0".encode() in Path(f"/proc/{rank1}/environ").read_bytes()
    os.kill(rank1, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    message = stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, stderr[-3000:]
    assert message.startswith("error: another process of this 2-process run ended (")
    deadline = time.time() + 20  # the loader workers see their parent gone within 5 s
    pgrep = ["pgrep", "-f", f"hydra.run.dir={out}"]
    while left := subprocess.run(pgrep, capture_output=True, text=True).stdout.split():
        assert time.time() < deadline, f"processes of the run still alive: {left}"
        time.sleep(0.5)
    command = shlex.split(message.split("resume with: ", 1)[1])
    resumed = run_cli("train", *command[3:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_training(tmp_path / "straight", out)


def test_a_rank_that_stops_answering_fails_the_run_after_the_collective_timeout(tiny_data, tmp_path):
    """A process of a 2-process run frozen mid-epoch (SIGSTOP, as a hung node would be): the other fails the run once
    a collective has waited trainer.strategy.timeout for it (15 s here, not torch's 30 min), in one line naming the
    resume command, and the frozen one gone before that line."""
    from test_faults import RUN, start, wait_for
    out = tmp_path / "run"
    proc = start([*data_overrides(tiny_data), *(a for a in RUN if not a.startswith("trainer.accelerator")), *DDP2,
                  "trainer.strategy.timeout.minutes=0.25", "trainer.max_epochs=50", f"hydra.run.dir={out}"], tmp_path)
    wait_for(out / "checkpoints" / "last.ckpt", proc)
    rank1 = next(int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                 if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes())
    frozen = time.time()
    os.kill(rank1, signal.SIGSTOP)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 15 <= time.time() - frozen < 90
    assert proc.returncode == 2, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: another process of this 2-process run stopped answering (a collective waited "
                              "0:00:15"), message
    assert f"{out}/checkpoints/last.ckpt holds its last checkpoint; resume with: " in message
    stat = Path(f"/proc/{rank1}/stat")  # gone before the run's last line, not after
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] == "Z", "the frozen process outlived the run"


@pytest.mark.parametrize("error, says", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 15000ms for recv operation to complete"),
     "stopped answering"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Application timeout caused pair "
                  "closure"), "stopped answering"),  # gloo's timeout under a transfer in progress (seen in CI)
    (RuntimeError("Connection reset by peer"), "ended"),
    (RuntimeError("CUDA out of memory"), None)])
def test_a_peer_lost_is_told_apart_from_other_errors(error, says):
    """The message a rank's error gets (vimexp.train.lost_a_peer): a timeout, in either of gloo's wordings, or a
    peer gone; anything else is not a lost peer and keeps its own traceback."""
    from datetime import timedelta
    from vimexp.train import lost_a_peer
    told = lost_a_peer(error, 7, timedelta(seconds=15))
    assert (told is None) if says is None else told.startswith(says) and "step 7" in told


def test_a_ddp_child_dies_with_the_first_process_however_it_ends(tmp_path):
    """die_with_parent, as every vimexp command runs it first: a process started with the first process's pid in
    VIMEXP_DDP_PARENT (as ddp_child_command's children are) is killed when that process is killed outright; one
    started without it lives on."""
    child = ("import sys, time; from vimexp.cli import die_with_parent; die_with_parent(); print('ready', flush=True); "
             "time.sleep(120)")
    parent = ("import os, subprocess, sys, time; env = dict(os.environ); "
              "env.update({'VIMEXP_DDP_PARENT': str(os.getpid())} if sys.argv[1] == 'ddp' else {}); "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], env=env, stdout=subprocess.PIPE, text=True); "
              "p.stdout.readline(); print(p.pid, flush=True); time.sleep(120)")
    for kind, dies in (("ddp", True), ("other", False)):
        proc = subprocess.Popen([sys.executable, "-c", parent, kind], stdout=subprocess.PIPE, text=True)
        pid = int(proc.stdout.readline())
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" \
                and time.time() < deadline:
            time.sleep(0.1)
        alive = Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        if alive:
            os.kill(pid, signal.SIGKILL)
        assert alive != dies, (kind, alive)


def test_ending_a_ddp_run_kills_its_processes_stopped_and_orphaned_before_it_returns():
    """end_the_run_s_processes in a first process: a stopped rank and the orphaned worker of a rank that is gone are
    both ended by the time it returns, so neither can write after the run's last line; a process of another run
    (another pid in VIMEXP_DDP_PARENT) lives on."""
    first = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        from vimexp.cli import PARENT_ENV, end_the_run_s_processes
        os.environ[PARENT_ENV] = str(os.getpid())
        sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # (none holds the test's pipes)
        stopped = subprocess.Popen(sleep, **quiet)
        os.kill(stopped.pid, signal.SIGSTOP)
        orphaner = subprocess.run([sys.executable, "-c", "import subprocess, sys; "
                                   f"print(subprocess.Popen({sleep!r}, stdout=-3, stderr=-3).pid)"],
                                  capture_output=True, text=True)
        stranger = subprocess.Popen(sleep, env={**os.environ, PARENT_ENV: "1"}, **quiet)
        time.sleep(0.5)
        end_the_run_s_processes()
        print(stopped.pid, orphaner.stdout.strip(), stranger.pid)
    """)
    done = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    stopped, orphan, stranger = map(int, done.stdout.split())

    def running(pid):
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(") ", 1)[1][0] != "Z"
    alive = running(stranger)
    os.kill(stranger, signal.SIGKILL)
    assert not running(stopped) and not running(orphan) and alive


@pytest.mark.parametrize("ddp", BACKENDS)
def test_sigterm_to_a_ddp_run_stops_it_in_order_with_the_resume_command(ddp, tiny_data, tmp_path):
    """SLURM's preemption signal to every process of a 2-process run: the ranks agree on a step, write last.ckpt and
    stop with 128 + SIGTERM and the command that resumes, the first process's own line last (not the watch's line
    for a lost process)."""
    from test_faults import RUN, start, wait_for
    out = tmp_path / "run"
    proc = start([*data_overrides(tiny_data), *(a for a in RUN if not a.startswith("trainer.accelerator")), *ddp,
                  f"hydra.run.dir={out}"], tmp_path)
    wait_for(out / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: stopped by SIGTERM at step") and "resume with: " in message
