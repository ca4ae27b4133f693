"""Data-parallel training on several GPUs of one host, measured through the real CLI (`python -m vimexp.train`):

    python -m vimexp.bench bench=ddp [bench.devices=2] [bench.phases=[throughput,equivalence,multirun,kill_rank]]
        [bench.record=FILE.json] [bench.train_overrides=[OVERRIDE,...]]

throughput   the same per-device batch on 1 GPU, 2, 4, ... and N (trainer=ddp): training img/s of the last epoch
             (results.json, first batch of the epoch excluded, data loading and EMA included);
             scaling efficiency = k-GPU img/s / (k x 1-GPU img/s).
equivalence  the same seed and global batch on 1 GPU and on N GPUs (each loads batch / N), with mixup, cutmix and
             drop path off so that nothing random depends on how a batch is split: final validation accuracy and the
             weight gap, set beside two 1-GPU runs of the same seed (the run-to-run floor of bf16 and atomics) and
             a 1-GPU run of another seed (the seed-to-seed spread of the accuracy).
multirun     a two-job Hydra sweep with trainer=ddp: one run directory, one results.json and one W&B run per job.
kill_rank    kill -9 on the last process of an N-GPU run mid-epoch, after a step checkpoint: how long the run took to
             fail, its exit status and last line; then the same command resumes it, set beside an uninterrupted run.

bench.accelerator=cpu runs the same phases as gloo processes on the CPU (to try them out: no speed to read there).

The record (bench.record, default out_dir/ddp.json) is merged into an existing file, so the phases can run in
separate calls. The runs' directories go under bench.work.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.bench import command, compose_train, say
from vimexp.build import build_task
from vimexp.data.synthetic import ensure_photo_folder
from vimexp.record import environment, write_json


def base_overrides(b) -> list[str]:
    """Every run's overrides: Vim-S at 224 px, bf16, on the built-in data, or (bench.data=photo) DeiT's ImageNet
    pipeline over photo-sized JPEGs generated once on the node (bench.photo), decoding as ImageNet's would."""
    if b.data == "builtin":
        data = ["data=builtin", "data.img_size=224"]
    elif b.data == "photo":
        photo = dict(b.photo)
        root = ensure_photo_folder(photo.pop("root"), **photo)
        data = ["data=imagenet", f"data.root={root}", f"data.num_classes={photo['classes']}"]
    else:
        raise VimexpError(f"bench.data={b.data!r}: choose builtin or photo")
    if b.accelerator not in ("gpu", "cpu"):
        raise VimexpError(f"bench.accelerator={b.accelerator!r}: choose gpu or cpu")
    return ["experiment=imagenet_vim_s", *data, "trainer.precision=bf16-mixed", f"model.kernel={b.kernel}",
            "logger=csv", f"data.num_workers={b.workers}", f"trainer.accelerator={b.accelerator}"]


SAME_SPLIT = ["task.mixup=0", "task.cutmix=0", "model.drop_path_rate=0"]  # nothing random that a batch split changes


def first_gpus(n: int) -> str:
    """CUDA_VISIBLE_DEVICES for GPUs 0..n-1."""
    return ",".join(map(str, range(n)))


def train(run_dir: Path, overrides: list[str], gpus: str) -> subprocess.Popen:
    """Start one training run on the listed GPUs (CUDA_VISIBLE_DEVICES); its log goes to run_dir/stdout.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "stdout.log", "w")
    command = [sys.executable, "-m", "vimexp.train", *overrides, f"hydra.run.dir={run_dir}"]
    say(f"[{time.strftime('%H:%M:%S')}] GPU {gpus}: {' '.join(command[3:])}")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpus})


def wait(*runs: subprocess.Popen):
    for run in runs:
        if run.wait() != 0:
            log = Path(run.args[-1].split("=", 1)[1]) / "stdout.log"
            sys.exit(f"error: {' '.join(run.args[3:])} failed (exit {run.returncode}); its log: {log}\n"
                     + log.read_text()[-3000:])


def result(run_dir: Path) -> dict:
    r = json.loads((run_dir / "results.json").read_text())
    return {k: r[k] for k in ("world_size", "train_img_per_sec", "gpu_peak_gib", "epochs", "wall_seconds")} | {
        "val_acc1": r["final"].get("val/acc1"), "val_acc1_ema": r["final"].get("val/acc1_ema")}


def _model_floats(state_dict: dict) -> dict[str, torch.Tensor]:
    """The model's floating-point tensors of a task's state dict, in float64."""
    return {k: v.double() for k, v in state_dict.items() if k.startswith("model.") and v.is_floating_point()}


def model_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The last checkpoint's model weights (float64) and its step."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return _model_floats(ckpt["state_dict"]), ckpt["global_step"]


def initial_weights(overrides: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The weights train() starts from: the model built right after seeding, as it does."""
    cfg = compose_train([*overrides, f"seed={seed}", "paths.output_dir=."])
    L.seed_everything(seed, workers=True, verbose=False)
    return _model_floats(build_task(cfg).state_dict())


def weight_gap(a: dict, b: dict, init: dict | None = None) -> dict:
    """How far apart two runs' weights are: relative to the weights, to how far training moved them, and at most."""
    flat = lambda w: torch.cat([t.flatten() for t in w.values()])  # noqa: E731
    fa, fb = flat(a), flat(b)
    gap = {"rel_to_weights": ((fa - fb).norm() / fa.norm()).item(), "max_abs": (fa - fb).abs().max().item(),
           "worst_tensor_rel": max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)}
    if init is not None:
        gap["rel_to_update"] = ((fa - fb).norm() / (fa - flat(init)).norm()).item()
    return {k: float(f"{v:.3g}") for k, v in gap.items()}


def device_counts(n: int) -> list[int]:
    """1, the powers of two below n, and n."""
    return sorted({1, n, *(2 ** k for k in range(1, n.bit_length()) if 2 ** k < n)})


def ddp(n: int) -> list[str]:
    return ["trainer=ddp", f"trainer.devices={n}"] if n > 1 else []


def throughput(out: Path, n: int, base: list[str], batch: int, epochs: int, extra: list[str]) -> dict:
    common = [*base, f"trainer.max_epochs={epochs}", *extra]
    runs = {}
    for k in device_counts(n):
        wait(train(out / f"tp_{k}gpu", [*common, f"data.batch_size={batch * k}", *ddp(k)], first_gpus(k)))
        runs[k] = result(out / f"tp_{k}gpu")
    one = runs[1]["train_img_per_sec"]
    return {"per_device_batch": batch, "epochs": epochs, "runs": {f"{k}_gpus": r for k, r in runs.items()},
            "scaling_efficiency": {f"{k}_gpus": round(r["train_img_per_sec"] / (k * one), 3)
                                   for k, r in runs.items() if k > 1}}


def equivalence(out: Path, n: int, base: list[str], batch: int, epochs: int, extra: list[str]) -> dict:
    common = [*base, *SAME_SPLIT, f"data.batch_size={batch}", f"trainer.max_epochs={epochs}", *extra]
    # the 1-GPU runs side by side, the repeat and the other seed sharing a GPU (their speed is not measured here)
    wait(train(out / "eq_1gpu", [*common, "seed=0"], "0"), train(out / "eq_1gpu_again", [*common, "seed=0"], "1"),
         train(out / "eq_1gpu_seed1", [*common, "seed=1"], "1"))
    wait(train(out / f"eq_{n}gpu", [*common, "seed=0", "trainer=ddp", f"trainer.devices={n}"], first_gpus(n)))
    runs = {name: result(out / name) for name in ("eq_1gpu", f"eq_{n}gpu", "eq_1gpu_again", "eq_1gpu_seed1")}
    init = initial_weights(common, seed=0)
    (one, steps), (many, steps_n), (again, _) = (model_weights(out / d)
                                                 for d in ("eq_1gpu", f"eq_{n}gpu", "eq_1gpu_again"))
    assert steps == steps_n, (steps, steps_n)
    return {"global_batch": batch, "epochs": epochs, "steps": steps, "runs": runs,
            f"weights_1gpu_vs_{n}gpu": weight_gap(one, many, init),
            "weights_1gpu_vs_1gpu_again": weight_gap(one, again, init),
            "val_acc1_gap_1gpu_vs_ngpu": round(runs[f"eq_{n}gpu"]["val_acc1"] - runs["eq_1gpu"]["val_acc1"], 2),
            "val_acc1_gap_seed0_vs_seed1": round(runs["eq_1gpu_seed1"]["val_acc1"] - runs["eq_1gpu"]["val_acc1"], 2)}


def multirun(out: Path, n: int, base: list[str], extra: list[str]) -> dict:
    root = out / "multirun"
    base = [o for o in base if not o.startswith("logger=")]  # W&B (offline) beside the CSV logs
    command = [sys.executable, "-m", "vimexp.train", "-m", *base, "trainer=ddp", f"trainer.devices={n}",
               "logger=default", "trainer.max_epochs=1", "+trainer.limit_train_batches=20",
               "+trainer.limit_val_batches=4", "seed=1,2", "data.batch_size=128", *extra]
    run = subprocess.run(command, cwd=out, env={**os.environ, "VIMEXP_ROOT": str(root), "WANDB_MODE": "offline",
                                                 "CUDA_VISIBLE_DEVICES": first_gpus(n)},
                         capture_output=True, text=True)
    (out / "multirun.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        sys.exit(f"error: the multirun failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    sweeps = sorted((root / "logs").glob("*/multirun/*/*"))
    jobs = [p for p in sweeps if p.is_dir() and (p / ".hydra").is_dir()]
    return {"command": " ".join(["python -m vimexp.train -m", *command[4:]]),
            "under_logs": sorted(str(p.relative_to(root / "logs")) for p in root.glob("logs/*/*")),  # one sweep
            "jobs": [{"dir": p.name, "world_size": json.loads((p / "results.json").read_text())["world_size"],
                      "wandb_runs": len(list((p / "wandb").glob("offline-run-*"))),
                      "rank1_log": (p / "run_rank1.log").is_file()} for p in jobs],
            "sweep_runs_started": run.stdout.count("results in")}


def rank_pid(rank0: int, rank: int) -> int:
    """The process of local rank `rank` among the children the first process started (Lightning sets LOCAL_RANK)."""
    for pid in Path(f"/proc/{rank0}/task/{rank0}/children").read_text().split():
        if f"LOCAL_RANK={rank}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes():
            return int(pid)
    raise VimexpError(f"no process of local rank {rank} under process {rank0}")


def kill_rank(out: Path, n: int, base: list[str], batch: int, epochs: int, extra: list[str],
              checkpoint_every: int) -> dict:
    if n < 2:
        raise VimexpError("bench.phases=[kill_rank] kills one process of a DDP run: set bench.devices to 2 or more")
    common = [*base, *SAME_SPLIT, f"data.batch_size={batch * n}", f"trainer.max_epochs={epochs}", *ddp(n),
              f"callbacks.step_checkpoint.every_n_train_steps={checkpoint_every}",
              "callbacks.step_checkpoint.train_time_interval=null", *extra]
    wait(train(out / "kill_straight", common, first_gpus(n)))
    run_dir = out / "kill_run"
    proc = train(run_dir, common, first_gpus(n))
    while not (run_dir / "checkpoints" / "last.ckpt").is_file():
        if proc.poll() is not None:
            raise VimexpError(f"the run to kill ended (exit {proc.returncode}) before its first step checkpoint: "
                              f"lower bench.checkpoint_every; its log: {run_dir / 'stdout.log'}")
        time.sleep(0.2)
    os.kill(rank_pid(proc.pid, n - 1), signal.SIGKILL)
    killed = time.time()
    exit_status = proc.wait()
    failed_after = time.time() - killed
    deadline = time.time() + 60  # the other processes and the loader workers go within seconds of the first
    while subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True).returncode == 0:
        if time.time() > deadline:
            raise VimexpError(f"processes of the killed run {run_dir} outlived it by a minute")
        time.sleep(0.5)
    log = run_dir / "stdout.log"
    log.rename(run_dir / "killed.log")  # the resumed run writes its own
    said = (run_dir / "killed.log").read_text().strip().replace("\r", "\n").splitlines()[-1]
    said = said[said.find("error: "):] if "error: " in said else said  # past the progress bar's last refresh
    wait(train(run_dir, common, first_gpus(n)))  # the same command resumes it
    (straight, steps), (resumed, steps_resumed) = model_weights(out / "kill_straight"), model_weights(run_dir)
    return {"world_size": n, "killed_local_rank": n - 1, "checkpoint_every": checkpoint_every,
            "failed_after_s": round(failed_after, 1), "exit": exit_status, "last_line": said,
            "resumed": "resuming from" in log.read_text(), "steps": [steps, steps_resumed],
            "bitwise_equal": steps == steps_resumed and all(torch.equal(straight[k], resumed[k]) for k in straight),
            "weights_straight_vs_resumed": weight_gap(straight, resumed, initial_weights(common, seed=0))}


PHASES = ("throughput", "equivalence", "multirun", "kill_rank")


def train_overrides_arg(overrides: list[str]) -> str:
    """bench.train_overrides as one shell word: a Hydra list of quoted overrides (an unquoted `=` can't be in one)."""
    return '"bench.train_overrides=[' + ",".join(f"'{o}'" for o in overrides) + ']"'


def run(cfg) -> dict:
    b = cfg.bench
    phases, extra = list(b.phases), [str(o) for o in b.train_overrides]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise VimexpError(f"unknown bench.phases {unknown}: choose from {', '.join(PHASES)}")
    if b.accelerator == "gpu" and torch.cuda.device_count() < b.devices:
        raise VimexpError(f"bench.devices={b.devices} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    work, out = Path(b.work).resolve(), Path(b.record)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(out.read_text()) if out.is_file() else {}
    record.setdefault("environment", environment(torch.device("cuda" if b.accelerator == "gpu" else "cpu")))
    record["environment"]["gpus"] = torch.cuda.device_count()
    base = base_overrides(b)
    for phase in tqdm(phases, desc="bench", unit="phase"):
        started = time.time()
        if phase == "multirun":
            record[phase] = multirun(work, b.devices, base, extra)
        elif phase == "kill_rank":
            record[phase] = kill_rank(work, b.devices, base, b.batch, b.epochs, extra, b.checkpoint_every)
        else:
            record[phase] = globals()[phase](work, b.devices, base, b.batch, b.epochs, extra)
        record[phase]["command"] = record[phase].get("command") or command(
            "bench=ddp", f"bench.devices={b.devices}", f"bench.phases=[{phase}]", f"bench.batch={b.batch}",
            f"bench.epochs={b.epochs}", f"bench.data={b.data}", f"bench.kernel={b.kernel}",
            f"bench.workers={b.workers}", f"bench.accelerator={b.accelerator}",
            *([train_overrides_arg(extra)] if extra else []))
        record[phase]["base_overrides"] = base
        record[phase]["seconds"] = round(time.time() - started)
        write_json(out, record)
        say(json.dumps({phase: record[phase]}, indent=1))
    print(f"record in {out.resolve()}")
    return record
