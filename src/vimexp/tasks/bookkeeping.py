"""What every task keeps beside its training: the validation history (results.json's best-of-run) and the run's wall
time, both travelling in the checkpoints so that a resumed run still knows them; each epoch's training images/s; and
preview images for W&B."""
import time
from pathlib import Path

import torch


class RunBookkeeping:
    """Mixin for a LightningModule (list it first): tasks append their validation metrics to `self.history`;
    `self.img_per_sec` is measured from the second batch of each epoch to its last (worker start-up and lazy
    initialisation excluded, and the validation and checkpoints at the epoch's end too: docs/optimisation.md, step 26).
    Tasks that override these hooks call super()."""

    history: list
    img_per_sec: float | None = None
    _timer: list | None = None
    _wall: tuple[float, float | None] = (0.0, None)  # (seconds in the run's earlier segments, this one's start)

    def log_preview(self, path):
        """Send a validation preview PNG (already written under the run directory) to W&B, if it logs there."""
        for logger in self.trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("val/preview", [str(path)], step=self.global_step)

    def wall_seconds(self) -> float:
        """The run's time in fit so far, over every segment of a resumed run."""
        before, start = self._wall
        return before + (time.time() - start if start is not None else 0.0)

    def on_fit_start(self):
        self._wall = (self._wall[0], time.time())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["val_history"] = self.history
        checkpoint["wall_seconds"] = self.wall_seconds()

    def on_load_checkpoint(self, checkpoint):
        self.history = checkpoint.get("val_history", [])
        self._wall = (checkpoint.get("wall_seconds", 0.0), self._wall[1])

    def on_train_epoch_start(self):
        self._timer = None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if batch_idx + 1 >= self.trainer.num_training_batches and torch.cuda.is_available():
            torch.cuda.synchronize()  # the epoch's last batch: the clock stops when the GPU is done with it
        now = time.perf_counter()
        if self._timer is None:
            self._timer = [now, 0, now]  # (start, images since, the latest batch's end)
        else:
            self._timer[1] += batch[0].shape[0]
            self._timer[2] = now

    def on_train_epoch_end(self):
        if self._timer and self._timer[1]:
            start, images, end = self._timer
            self.img_per_sec = images * self.trainer.world_size / (end - start)
            self.log("train/img_per_sec", self.img_per_sec)


def save_preview(fig, out_dir, step: int, dpi: int = 80) -> Path:
    """Write a matplotlib preview figure to <out_dir>/previews/val_step<step>.png and close it."""
    import matplotlib.pyplot as plt

    path = Path(out_dir) / "previews" / f"val_step{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
