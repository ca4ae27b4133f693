"""Image classification as a LightningModule: DeiT's recipe (Mixup/CutMix, label smoothing, AdamW with no-decay
groups, warmup + cosine per epoch, EMA evaluated beside the raw weights) around any registered backbone."""
from itertools import pairwise

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vimexp import VimexpError
from vimexp.data.sampling import seeded
from vimexp.models.backbone import build_backbone
from vimexp.tasks.bookkeeping import RunBookkeeping
from vimexp.tasks.cuda_graph import GraphedTraining, graph_blocker
from vimexp.tasks.optim import scaled_lr


def mixup_chunks(offset: int, batch: int, group: int | None) -> list[tuple[int, int, int]]:
    """(group, start, stop): the pieces of a device's batch, global images offset .. offset + batch, that fall in one
    group of `group` consecutive images of the global batch (None: the device's batch is one group)."""
    group = group or batch
    edges = sorted({0, batch, *range(group - offset % group, batch, group)})
    return [((offset + a) // group, a, b) for a, b in pairwise(edges)]


def group_mixup(mixup: Mixup, images, targets, offset: int, group: int | None, seed: int):
    """timm's Mixup once per mixup group: its lambda, mixup-or-cutmix switch and box drawn from an RNG seeded by
    (seed, group), pairs formed within the group's images on this device. As each official GPU mixes its own batch,
    and the same on any number of devices: a group split over devices draws the same values on each of them."""
    mixed = []
    for gid, a, b in mixup_chunks(offset, len(images), group):
        if (b - a) % 2:
            raise VimexpError(f"mixup pairs images within a group, but {b - a} images of a group are on one device: "
                              "make data.mixup_group and the per-device batch even")
        with seeded(seed, gid):
            mixed.append(mixup(images[a:b], targets[a:b]))
    return torch.cat([x for x, _ in mixed]), torch.cat([y for _, y in mixed])


class ClassificationTask(RunBookkeeping, L.LightningModule):
    kind = "classification"

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, num_classes: int, global_batch_size: int,
                 *, monitor: str, mixup: float, cutmix: float, mixup_prob: float, mixup_switch_prob: float,
                 mixup_mode: str, smoothing: float, ema_decay: float | None, mixup_group: int | None = None,
                 cuda_graph: bool = True):
        """The recipe's knobs (keyword arguments) have their defaults in conf/task/classification.yaml;
        mixup_group: images per mixup draw (data.mixup_group; None: a device's batch); cuda_graph: replay the
        model's training forward and backward as CUDA graphs where the run allows (tasks/cuda_graph.py)."""
        super().__init__()
        self.save_hyperparameters()
        self.model = build_backbone(model)  # init_from: vimexp or official weights, pos_embed fitted to its grid
        self.ema = ModelEmaV3(self.model, decay=ema_decay).requires_grad_(False) if ema_decay else None  # DDP: no grad
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                               mode=mixup_mode, label_smoothing=smoothing, num_classes=num_classes)
        self.train_loss = MeanMetric(nan_strategy="disable")  # its NaN check syncs the GPU; StopOnDivergence sees NaN
        self.val_acc = torch.nn.ModuleDict({
            f"{w}_{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
            for w in (["raw", "ema"] if self.ema else ["raw"]) for k in (1, min(5, num_classes))})
        self.history = []
        self.graphed = None  # the model's training step as CUDA graphs (task.cuda_graph), set by on_train_start

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def forward(self, x):
        return self.model(x)

    # ----- training
    def on_train_start(self):
        self.graphed = None
        if self.hparams.cuda_graph and self.device.type == "cuda":
            blocker = graph_blocker(self.model, self.trainer)
            if blocker:
                rank_zero_info(f"task.cuda_graph: the training step runs eagerly: {blocker}")
            else:
                self.graphed = GraphedTraining(self.model)

    def on_train_end(self):
        if self.graphed is not None:
            self.graphed.release()
            self.graphed = None

    def training_step(self, batch, batch_idx):
        images, targets = batch
        net = self.graphed or self.model
        if self.mixup is not None:  # soft targets, label smoothing folded in
            seed = int(np.random.randint(2**31))  # the same on every rank: the RNGs are seeded per batch, not per rank
            images, targets = group_mixup(self.mixup, images, targets, self.global_rank * len(images),
                                          self.hparams.mixup_group, seed)
            loss = SoftTargetCrossEntropy()(net(images), targets)
        else:
            loss = F.cross_entropy(net(images), targets, label_smoothing=self.hparams.smoothing)
        self.train_loss(loss)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True)
        return loss

    # ----- validation: raw and EMA weights
    def validation_step(self, batch, batch_idx):
        images, targets = batch
        nets = {"raw": self.model, **({"ema": self.ema.module} if self.ema else {})}
        for name, net in nets.items():
            logits = net(images)
            if name == "raw":
                self.log("val/loss", F.cross_entropy(logits, targets), sync_dist=True)
            for key, metric in self.val_acc.items():
                if key.startswith(name):
                    metric(logits, targets)

    # ----- optimisation: DeiT's recipe through timm
    def configure_optimizers(self):
        o, s = self.hparams.optimizer, self.hparams.scheduler
        lr = scaled_lr(o, self.hparams.global_batch_size * self.trainer.accumulate_grad_batches, dense=False)
        # no weight decay on 1-d params (norms, biases, D) and model.no_weight_decay(); 2-d A_log IS decayed (official)
        optimizer = create_optimizer_v2(self.model, opt=o["name"], lr=lr, weight_decay=o["weight_decay"],
                                        eps=o.get("eps", 1e-8), betas=tuple(o.get("betas", (0.9, 0.999))),
                                        layer_decay=o.get("layer_decay"),
                                        **({"fused": True} if o["name"] in ("adam", "adamw") else {}))
        self.lr_schedule = CosineLRScheduler(optimizer, t_initial=s["epochs"], lr_min=s["min_lr"],
                                             warmup_t=s["warmup_epochs"], warmup_lr_init=s["warmup_lr"])
        return optimizer

    def on_train_epoch_start(self):
        # The lr of an epoch is a pure function of its index, so a resumed run gets it right without scheduler state.
        # DeiT steps the schedule after each epoch with that epoch's index: epoch e > 0 runs at lr(e - 1).
        self.lr_schedule.step(epoch=max(self.current_epoch - 1, 0))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        super().on_train_epoch_start()

    # ----- validation history (for best-of-run results); throughput and checkpointing it: RunBookkeeping
    def on_validation_epoch_end(self):
        metrics = {}
        for key, metric in self.val_acc.items():
            name, k = key.split("_")
            metrics[f"{'val' if name == 'raw' else 'val_ema'}/acc{1 if k == '1' else 5}"] = metric.compute().item() * 100
            metric.reset()
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == "val/acc1")
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, **metrics})

    def on_before_zero_grad(self, optimizer):
        # right after each optimizer step (once per accumulated batch), before any callback saves a checkpoint
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
