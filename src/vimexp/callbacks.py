"""What keeps a long run trustworthy, as Lightning callbacks: RNG streams that depend only on the position in training
(so a resumed run draws what a straight one does), the run's config in every checkpoint, a stop on divergence, a
checkpoint on preemption (SIGTERM, SIGUSR1) or Ctrl-C, and a progress bar that never waits for the GPU."""
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

from vimexp import VimexpError
from vimexp.cli import checkpoint_kept


class BatchSeed(L.Callback):
    """Reseed every RNG before each training batch from (seed, epoch, batch): mixup and drop path then depend on where
    training is, not on what ran before (loader start-up, a restart), so a run resumed at any step continues exactly.
    Data order and augmentation are seeded per sample by the datamodule."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        L.seed_everything(hash((self.seed, trainer.current_epoch, batch_idx)) % 2**32, workers=True, verbose=False)


class SaveConfig(L.Callback):
    """Keep the run's resolved config in every checkpoint, so that eval (and a reader) know what made the weights."""

    def __init__(self, cfg):
        run = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # composed in-process, cfg has it
        self.config = OmegaConf.to_container(run, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["vimexp_config"] = self.config


class StopOnDivergence(L.Callback):
    """A non-finite loss or gradient norm (on any rank) stops the run with a one-line error naming the step, before the
    optimizer applies it, so last.ckpt keeps the last good weights. `max_skips` lets that many bad steps pass without
    an update first (bf16 spikes). Under fp16 loss scaling, inf gradients are the scaler's to skip.

    With a fused Adam(W) (the tasks' default) the check costs no GPU sync: the optimizer skips a flagged step on the
    device (its `found_inf`, as under AMP's GradScaler), the flagged steps are noted on the device, and the host reads
    them every `check_every` steps, before every checkpoint (a run that diverged stops there, unwritten) and at the
    end of an epoch: a sync a step had held the host's launches back (docs/optimisation.md, step 26).
    Any other optimizer is checked, and its step skipped, step by step."""

    def __init__(self, max_skips: int = 0, check_every: int = 50):
        self.max_skips, self.skipped, self.check_every = max_skips, 0, check_every
        self._bad = None  # this step's non-finite loss, on the device
        self._flagged = []  # a (2,) device tensor a step since the last look: the step's number where flagged, else -1
        self._trainer = None

    def on_before_backward(self, trainer, pl_module, loss):
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        bad_loss = self._bad if self._bad is not None else torch.zeros((), dtype=torch.bool, device=pl_module.device)
        self._bad = None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        scaled = str(trainer.precision).startswith("16")
        norm = torch.nn.utils.get_total_norm(grads) if grads and not scaled else None
        bad = bad_loss | (~torch.isfinite(norm) if norm is not None else False)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.float(), reduce_op="max") > 0
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        if getattr(optimizer, "_step_supports_amp_scaling", False) and not scaled:
            optimizer.found_inf = bad.float()  # the fused step leaves parameters and moments as they were
            step = torch.full((), trainer.global_step, device=bad.device)
            self._flagged.append(torch.stack([torch.where(bad, step, -1), torch.where(bad_loss, step, -1)]))
            if len(self._flagged) >= self.check_every:
                self._look(trainer)
            return
        if bad.item():
            self._judge(trainer, trainer.global_step, bool(bad_loss.item()))
            for p in pl_module.parameters():
                p.grad = None  # the optimizer leaves parameters without gradients alone

    def _look(self, trainer):
        """Judge the steps flagged on the device since the last look, in order."""
        flagged, self._flagged = self._flagged, []
        for step, loss_step in torch.stack(flagged).tolist() if flagged else []:
            if step >= 0:
                self._judge(trainer, step, loss_step >= 0)

    def _judge(self, trainer, step: int, bad_loss: bool):
        """A skipped step within max_skips is said; the one beyond stops the run."""
        what = "loss" if bad_loss else "gradient norm"
        if self.skipped < self.max_skips:
            self.skipped += 1
            rank_zero_info(f"step {step}: non-finite {what}, update skipped ({self.skipped} of "
                           f"callbacks.divergence.max_skips={self.max_skips})")
            return
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        kept = f"{last} holds the last good weights" if last.is_file() else "no checkpoint was written"
        raise VimexpError(f"training diverged at step {step} (epoch {trainer.current_epoch}): "
                          f"non-finite {what}; {kept}. Lower optimizer.lr, or let bad steps pass with "
                          "callbacks.divergence.max_skips=K")

    def on_train_epoch_end(self, trainer, pl_module):
        self._look(trainer)

    def setup(self, trainer, pl_module, stage):
        self._trainer = trainer

    def state_dict(self):
        self._look(self._trainer)  # the count saved includes every step taken so far
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict):
        self.skipped = state_dict["skipped"]


class RunInterrupted(VimexpError):
    """A run stopped on a signal after writing a resumable checkpoint; exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class CheckpointOnSignal(L.Callback):
    """SIGTERM and SIGUSR1 (what SLURM sends before it preempts or times out a job) and Ctrl-C: finish the step, write
    checkpoints/last.ckpt (every rank agrees on when), and stop with the command that resumes. A second Ctrl-C
    stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, resume_command: str = ""):
        self.resume_command, self.received, self._previous = resume_command, None, {}

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        self._trainer = trainer
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals to whoever owns them
                return

    def on_train_start(self, trainer, pl_module):
        # Lightning set its own SIGTERM handler after `setup`, calling ours after its own, which forwards the signal
        # to the DDP children and broadcasts from inside the handler: a collective wherever the signal lands, which
        # deadlocked a 2-process run (tests/test_distributed.py). Ours alone again; Lightning's teardown puts ours back.
        if self._previous:
            signal.signal(signal.SIGTERM, self._handle)

    def teardown(self, trainer, pl_module, stage):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:  # not Lightning's KeyboardInterrupt: status 1
            kept = checkpoint_kept(Path(self._trainer.default_root_dir))
            raise RunInterrupted(f"stopped at once by a second Ctrl-C at step {self._trainer.global_step}; {kept}; "
                                 f"resume with: {self.resume_command}", signum)
        self.received = signum
        # Lightning notes SIGTERM too, and would end the run without a checkpoint and with status 0 at its next check
        self._trainer._signal_connector.received_sigterm = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        signum = self.received or signal.SIGTERM  # another rank got it
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        name = signal.Signals(signum).name
        raise RunInterrupted(f"stopped by {name} at step {trainer.global_step}, checkpoint {path} written; "
                             f"resume with: {self.resume_command}", signum)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing the training metrics named in `show` (logged without prog_bar) without syncing
    the GPU. Lightning turns every prog_bar metric into a Python number after every batch: a sync a step that left
    the GPU idle while the host prepared the next batch (docs/optimisation.md, step 43). Here each refresh starts a
    copy of the metrics to pinned host memory and shows the latest copy that has landed: one refresh behind."""

    def __init__(self, refresh_rate: int = 10, show: list[str] | tuple = ("train/loss",)):
        super().__init__(refresh_rate=refresh_rate)
        self.show, self._copies, self._shown = list(show), [], {}

    def get_metrics(self, trainer, pl_module):
        while self._copies and self._copies[0][0].query():  # landed: the newest such copy wins
            _, names, values = self._copies.pop(0)
            self._shown = dict(zip(names, values.tolist()))
        names = [k for k in self.show if isinstance(trainer.callback_metrics.get(k), torch.Tensor)]
        if names:
            values = torch.stack([trainer.callback_metrics[k].detach().float().reshape(()) for k in names])
            if values.is_cuda:
                host = torch.empty(len(names), pin_memory=True)
                host.copy_(values, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                self._copies.append((done, names, host))
            else:
                self._shown = dict(zip(names, values.tolist()))
        return {**super().get_metrics(trainer, pl_module), **self._shown}
