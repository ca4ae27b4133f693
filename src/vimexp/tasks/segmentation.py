"""Semantic segmentation as a LightningModule: a plain backbone (Vim or DeiT, no class token) -> the simple feature
pyramid -> UperNet + auxiliary FCN (Table 2), or its last map -> a Segmenter mask transformer (Table 4); the recipe of
the official Vim configs: AdamW with layer-wise lr decay, linear warm-up then poly decay per iteration, sliding-window
evaluation, mIoU / mAcc / aAcc over the whole validation set."""
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vimexp.data.ade20k import IGNORE
from vimexp.models.backbone import build_backbone
from vimexp.models.dense.segmentation import SegmentationModel
from vimexp.tasks.bookkeeping import RunBookkeeping, save_preview
from vimexp.tasks.optim import dense_optimizers


def slide_logits(net, image: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """MMSeg's sliding-window inference: crop x crop windows every `stride` pixels (the last one flush with the
    border), logits resized to each window and averaged where windows overlap. Windows smaller than `crop` (images
    smaller than it) are zero-padded and the padding cut off again."""
    batch, _, h, w = image.shape
    logits = image.new_zeros(batch, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    for top in _starts(h, crop, stride):
        for left in _starts(w, crop, stride):
            window = image[..., top:top + crop, left:left + crop]
            wh, ww = window.shape[-2:]
            out = net(F.pad(window, [0, crop - ww, 0, crop - wh]))[0]
            out = F.interpolate(out, size=(crop, crop), mode="bilinear", align_corners=False)[..., :wh, :ww]
            logits[..., top:top + wh, left:left + ww] += out
            count[..., top:top + wh, left:left + ww] += 1
    return logits / count


def seg_loss(logits: torch.Tensor, labels: torch.Tensor, avg_non_ignore: bool = False) -> torch.Tensor:
    """Pixel cross-entropy at the labels' size, ignored pixels contributing 0. avg_non_ignore=False (MMSeg's
    CrossEntropyLoss default, the official configs) divides the sum by every pixel of the batch, the ignored and the
    crop padding included; True averages over the labelled pixels only (PyTorch's mean with ignore_index)."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if avg_non_ignore:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum") / labels.numel()


def _starts(size: int, crop: int, stride: int) -> list[int]:
    grids = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


class SegmentationTask(RunBookkeeping, L.LightningModule):
    kind = "segmentation"

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, num_classes: int, global_batch_size: int,
                 *, monitor: str, decoder: str, out_indices: list[int], channels: int, aux_channels: int,
                 aux_convs: int, aux_weight: float, segmenter_depth: int, crop_size: int, slide_stride: int,
                 num_preview: int, feature: str | None = None, loss_avg_non_ignore: bool = False):
        """The recipe's knobs (keyword arguments) have their defaults in conf/task/segmentation.yaml."""
        super().__init__()
        self.save_hyperparameters()
        backbone = build_backbone(model, dense=True, img_size=crop_size)
        self.model = SegmentationModel(backbone, num_classes, decoder, out_indices, channels, aux_channels, aux_convs,
                                       segmenter_depth=segmenter_depth, feature=feature)
        self.metrics = nn.ModuleDict({
            "mIoU": MulticlassJaccardIndex(num_classes, ignore_index=IGNORE, average="macro"),
            "mAcc": MulticlassAccuracy(num_classes, ignore_index=IGNORE, average="macro"),
            "aAcc": MulticlassAccuracy(num_classes, ignore_index=IGNORE, average="micro")})
        self.history, self.preview = [], []

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def forward(self, x):
        return self.model(x)[0]

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits, aux = self.model(images)
        loss = seg_loss(logits, labels, self.hparams.loss_avg_non_ignore)
        if aux is not None:
            loss = loss + self.hparams.aux_weight * seg_loss(aux, labels, self.hparams.loss_avg_non_ignore)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        image, label = batch  # one whole image (resized) and its full-resolution label
        h = self.hparams
        logits = slide_logits(self.model, image, h.num_classes, h.crop_size, h.slide_stride)
        pred = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
        for metric in self.metrics.values():
            metric(pred, label)
        if batch_idx < h.num_preview:
            self.preview.append((image[0].float().cpu(), label[0].cpu(), pred[0].cpu()))

    def on_validation_epoch_end(self):
        values = {f"val/{k}": m.compute().item() * 100 for k, m in self.metrics.items()}
        for metric in self.metrics.values():
            metric.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "val/mIoU")
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, "step": self.global_step, **values})
            self._log_preview()
        self.preview = []

    def _log_preview(self):
        if self.preview and self.trainer.is_global_zero:
            self.log_preview(preview_grid(self.preview, self.hparams.num_classes, self.trainer.default_root_dir,
                                          self.global_step))

    def configure_optimizers(self):
        return dense_optimizers(self)


def preview_grid(previews, num_classes: int, out_dir, step: int) -> Path:
    """A PNG of validation images (rows): the image, its ground truth, the prediction; ignored pixels black."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = plt.get_cmap("tab20" if num_classes <= 20 else "gist_ncar", num_classes)
    fig, axes = plt.subplots(len(previews), 3, figsize=(7.5, 2.5 * len(previews)), squeeze=False)
    for row, (image, label, pred) in zip(axes, previews):
        shown = (image - image.amin()) / (image.amax() - image.amin()).clamp_min(1e-6)
        row[0].imshow(shown.permute(1, 2, 0).numpy())
        for ax, lab in ((row[1], label), (row[2], pred)):
            rgb = colours(lab.clamp(max=num_classes - 1).numpy())[..., :3]
            rgb[lab.numpy() == IGNORE] = 0
            ax.imshow(rgb, interpolation="nearest")
        for ax, title in zip(row, ("image", "ground truth", "prediction")):
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    return save_preview(fig, out_dir, step, dpi=80)
