"""The training step replayed as CUDA graphs (vimexp/tasks/cuda_graph.py) against the same step run eagerly, through
the optimizer and the real CLI (kill -9 and resume, divergence), and when a run may not graph it."""
import copy
import os
import signal
import threading
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import data_overrides, run_cli
from test_faults import RUN, assert_same_training, start, wait_for
from vimexp.models import create_model
from vimexp.tasks.cuda_graph import GraphedTraining, graph_blocker

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("world, accumulate, model, blocked_by", [
    (1, 1, {}, None), (2, 1, {}, "DDP"), (1, 4, {}, "accumulate_grad_batches"), (1, 1, "compiled", "compile"),
    (1, 1, dict(bidirectional="sequence"), "bidirectional=sequence")])  # its flip is drawn on the host
def test_runs_that_cannot_graph_their_step_say_why(world, accumulate, model, blocked_by):
    net = create_model("vim_nano", depth=2, kernel="torch", **(model if isinstance(model, dict) else {}))
    if model == "compiled":
        net.compile()
    why = graph_blocker(net, SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate))
    assert why is None if blocked_by is None else blocked_by in why


def _step(net, model, x, target, bf16):
    """One forward and backward as the task runs it: under Lightning's autocast, weight cache on."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(net(x), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel, bf16, tol", [("fused", False, 1e-4), ("fused", True, 1e-2), ("torch", False, 1e-5)])
def test_graphed_steps_match_eager(kernel, bf16, tol):
    """Capture at the first call, then replays on new batches: the loss and every gradient as the eager step's (up to
    the fused backward's atomic additions, whose order varies); another batch shape and eval mode run eagerly."""
    torch.manual_seed(0)
    eager = create_model("vim_ti", kernel=kernel, drop_path_rate=0.0, depth=4).cuda().train()
    model = copy.deepcopy(eager)
    graphed = GraphedTraining(model)
    for batch in (8, 8, 8, 4):
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        target = torch.randint(0, 1000, (batch,), device="cuda")
        (loss, grads), (loss_g, grads_g) = _step(eager, eager, x, target, bf16), _step(graphed, model, x, target, bf16)
        errs = {n: _rel(grads_g[n], grads[n]) for n in grads}
        assert _rel(loss_g, loss) <= tol and max(errs.values()) <= tol, (batch, loss_g, loss, max(errs.items(),
                                                                                                key=lambda kv: kv[1]))
    assert graphed.shape == (8, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        assert torch.equal(graphed(x), model(x))


@pytest.mark.gpu
@gpu
def test_replays_draw_from_the_seeded_rng_and_capture_leaves_it_alone():
    """Drop path inside the graph draws from the CUDA RNG as seeded before each replay (what the per-batch reseeding
    of a resumable run relies on), and the capture's warm-up steps leave the RNG as they found it."""
    torch.manual_seed(0)
    model = create_model("vim_ti", kernel="fused", drop_path_rate=0.3, depth=4).cuda().train()
    graphed = GraphedTraining(model)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    state = torch.cuda.get_rng_state()
    graphed._capture(x)
    assert torch.equal(torch.cuda.get_rng_state(), state)

    def logits(seed):
        torch.manual_seed(seed)
        return graphed(x).detach().clone()  # a replay's outputs live in the graph's buffers: the next one overwrites
    first, again, other = logits(1), logits(1), logits(2)
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name, kwargs", [("vim_s", {}), ("vim_ti", dict(rope=True, rope_residual=True)),
                                          ("hier_vim_t", {}), ("deit_ti", dict(drop_path_rate=0.1)), ("swin_t", {})])
def test_every_classification_family_captures(name, kwargs):
    """Each backbone of the paper's classification experiments captures and replays under bf16 autocast (the
    default task.cuda_graph=true would otherwise stop those runs at their first step)."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).cuda().train()
    eager = copy.deepcopy(model)
    graphed = GraphedTraining(model)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    for net in (eager, graphed, graphed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(x).float().logsumexp(-1).mean()
        loss.backward()
    assert graphed.shape == x.shape and torch.isfinite(loss)
    with_grad = {n for n, p in eager.named_parameters() if p.grad is not None}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == with_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel, tol", [("torch", 1e-5), ("fused", 1e-4)])
def test_optimizer_steps_between_replays_train_as_eager_steps_do(kernel, tol):
    """Five fused-AdamW steps, gradients set to None between them as Lightning does: the graph's gradient buffers,
    handed to the optimizer and dropped each step, leave the weights where eager steps leave them. Then `release()`
    gives the model its own forward back."""
    torch.manual_seed(0)
    eager = create_model("vim_ti", kernel=kernel, drop_path_rate=0.0, depth=4).cuda().train()
    model = copy.deepcopy(eager)
    graphed = GraphedTraining(model)
    runs = [(net, torch.optim.AdamW(params.parameters(), lr=1e-3, fused=True))
            for net, params in ((eager, eager), (graphed, model))]
    for _ in range(5):
        x = torch.randn(8, 3, 224, 224, device="cuda")
        target = torch.randint(0, 1000, (8,), device="cuda")
        for net, optimizer in runs:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), target).backward()
            optimizer.step()
    weights = dict(eager.named_parameters())
    errs = {n: _rel(p, weights[n]) for n, p in model.named_parameters()}
    assert max(errs.values()) <= tol, max(errs.items(), key=lambda kv: kv[1])
    assert "forward" in model.__dict__
    graphed.release()
    assert "forward" not in model.__dict__ and graphed.shape is None


def allocate_pinned_memory_until(stop: threading.Event, errors: list):
    """What the loader's pin-memory thread does in a run's first batches: fresh pinned allocations, and frees."""
    try:
        while not stop.is_set():
            torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
            torch._C._host_emptyCache()  # so that the next one allocates anew
    except Exception as e:
        errors.append(e)


@pytest.mark.gpu
@gpu
def test_capture_counts_only_its_own_threads_cuda_calls():
    """A thread allocating pinned memory during the capture (the loader's pin-memory thread) neither invalidates it
    nor fails itself: in make_graphed_callables' default global mode it did, now and then, stopping the run."""
    model = create_model("vim_ti", depth=2).cuda().train()
    graphed, x = GraphedTraining(model), torch.randn(4, 3, 224, 224, device="cuda")
    stop, errors = threading.Event(), []
    thread = threading.Thread(target=allocate_pinned_memory_until, args=(stop, errors))
    thread.start()
    try:
        graphed(x).sum().backward()
    finally:
        stop.set()
        thread.join()
    assert graphed.shape == x.shape and not errors, errors


# the CLI on the GPU, graphs on by default: a tiny Vim on the built-in shapes (tests/test_faults.py's run), torch
# kernels and deterministic algorithms, so a straight run and a killed-and-resumed one can agree bit for bit
GPU_RUN = [*(a for a in RUN if not a.startswith("trainer.accelerator")), "trainer.accelerator=gpu",
           "model.kernel=torch", "trainer.deterministic=true"]


@pytest.fixture(scope="module")
def straight_on_gpu(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight_gpu")
    done = run_cli("train", *data_overrides(tiny_data), *GPU_RUN, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "captured as CUDA graphs" in done.stdout + done.stderr
    return cwd / "run"


@pytest.mark.gpu
@gpu
def test_kill_9_then_resume_with_graphs_is_exact(straight_on_gpu, tiny_data, tmp_path):
    """Killed mid-epoch after a checkpoint, the same command resumes (capturing again, mid-epoch) and ends where the
    straight graphed run does, bit for bit: weights, EMA, optimizer state, results."""
    out = tmp_path / "run"
    args = [*data_overrides(tiny_data), *GPU_RUN, f"hydra.run.dir={out}"]
    proc = start(args, tmp_path)
    wait_for(out / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli("train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "captured as CUDA graphs" in resumed.stdout + resumed.stderr
    assert_same_training(straight_on_gpu, out)


@pytest.mark.gpu
@gpu
def test_divergence_under_graphs_stops_with_good_checkpoints(tiny_data, tmp_path):
    """A diverging graphed run stops in one line, its checkpoints finite (the skipped step's graph-owned gradients
    never reach the weights)."""
    out = tmp_path / "run"
    run = run_cli("train", *data_overrides(tiny_data), *GPU_RUN, "optimizer.lr=1e6", f"hydra.run.dir={out}",
                  cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: training diverged at step ")
    for ckpt in (out / "checkpoints").glob("*.ckpt"):
        weights = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), ckpt


class ForbidGpuSyncs(L.Callback):
    """Any GPU sync is an error from the end of the 3rd training batch to the start of the 17th (the logger's first
    write, at log_every_n_steps=20, comes after) or the epoch's last but one."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx >= min(16, trainer.num_training_batches - 2):
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rand_augment_on", ["workers", "device"])
def test_training_steps_never_wait_for_the_gpu(rand_augment_on, tiny_data, tmp_path):
    """The CLI's steps (loader hooks, mixup, graphs, divergence flags, EMA, progress bar) make no GPU sync, so the
    host queues the next step while the GPU runs this one; a sync fails the run, naming the call."""
    tests = os.path.dirname(__file__)
    run = run_cli("train", *data_overrides(tiny_data), *GPU_RUN, "data.batch_size=4", "trainer.max_epochs=1",
                  "callbacks.step_checkpoint.every_n_train_steps=1000", "data.auto_augment=rand-m9-mstd0.5-inc1",
                  f"data.rand_augment_on={rand_augment_on}",
                  "+callbacks.forbid_syncs._target_=test_cuda_graph.ForbidGpuSyncs", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path, env={"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "captured as CUDA graphs" in run.stdout + run.stderr
