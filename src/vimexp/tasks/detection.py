"""COCO detection and instance segmentation as a LightningModule: the Cascade Mask R-CNN of vimexp.models.dense.cascade
on a plain backbone (Vim, or DeiT with ViTDet's window attention), the official Vim-Det recipe, scored with
pycocotools."""
from pathlib import Path

import lightning as L
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from vimexp.data.coco import coco_results
from vimexp.models.backbone import build_backbone
from vimexp.models.dense.cascade import CascadeMaskRCNN
from vimexp.tasks.bookkeeping import RunBookkeeping, save_preview
from vimexp.tasks.optim import dense_optimizers


def to_coco(detection: dict, target: dict, cat_ids: list[int]) -> tuple[list[dict], list[dict]]:
    """One image's detections as COCO results (boxes [x, y, w, h] and RLE masks in the original image's pixels)."""
    from pycocotools import mask as mask_utils

    boxes = detection["boxes"].float().cpu() / target["scale"]
    h, w = target["orig_size"]
    masks = paste_masks_in_image(detection["masks"].float().cpu(), boxes, (h, w))[:, 0] > 0.5
    box_results, mask_results = [], []
    for box, score, label, mask in zip(boxes.tolist(), detection["scores"].tolist(), detection["labels"].tolist(),
                                       masks.numpy()):
        common = {"image_id": target["image_id"], "category_id": cat_ids[label - 1], "score": score}
        box_results.append({**common, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        rle = mask_utils.encode(mask[:, :, None].astype("uint8", order="F"))[0]
        mask_results.append({**common, "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return box_results, mask_results


class DetectionTask(RunBookkeeping, L.LightningModule):
    kind = "detection"

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, num_classes: int, global_batch_size: int,
                 *, monitor: str, size: int, channels: int, anchor_sizes: list[int], fc_dim: int, roi_per_image: int,
                 rpn_pre_nms: list[int], rpn_post_nms: list[int], score_thresh: float, detections_per_img: int,
                 num_preview: int):
        """The recipe's knobs (keyword arguments) have their defaults in conf/task/detection.yaml."""
        super().__init__()
        self.save_hyperparameters()
        backbone = build_backbone(model, dense=True, img_size=size)
        self.model = CascadeMaskRCNN(backbone, num_classes, channels, tuple(anchor_sizes), fc_dim=fc_dim,
                                     roi_per_image=roi_per_image, rpn_pre_nms=tuple(rpn_pre_nms),
                                     rpn_post_nms=tuple(rpn_post_nms), score_thresh=score_thresh,
                                     detections_per_img=detections_per_img)
        self.history, self.results, self.preview = [], {"bbox": [], "segm": []}, []

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True,
                      batch_size=len(images))
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        cat_ids = self.trainer.datamodule.val_set.cat_ids
        for i, (detection, target) in enumerate(zip(self.model(images, targets), targets)):
            boxes, masks = to_coco(detection, target, cat_ids)
            self.results["bbox"] += boxes
            self.results["segm"] += masks
            if len(self.preview) < self.hparams.num_preview:
                self.preview.append((images[i].float().cpu(), target, {k: v.cpu() for k, v in detection.items()}))

    def on_validation_epoch_end(self):
        results = self.results
        if self.trainer.world_size > 1:  # every rank scores the whole validation set
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, results)
            results = {k: [r for part in gathered for r in part[k]] for k in results}
        coco_gt = self.trainer.datamodule.val_set.coco
        values = {}
        for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
            for name, value in coco_results(coco_gt, results[iou_type], iou_type).items():
                values[f"val/{prefix}_{name}"] = value
        for name, value in values.items():
            self.log(name, value, prog_bar=name in ("val/box_AP", "val/mask_AP"), rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, "step": self.global_step, **values})
            if self.trainer.is_global_zero and self.preview:
                self.log_preview(preview_detections(self.preview, self.trainer.default_root_dir, self.global_step))
        self.results, self.preview = {"bbox": [], "segm": []}, []

    def configure_optimizers(self):
        return dense_optimizers(self)


def preview_detections(previews, out_dir, step: int, min_score: float = 0.5) -> Path:
    """A PNG of validation images: the ground truth would need the annotation file, so each row shows the image and
    its detections above min_score (boxes with class id and score, masks)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    fig, axes = plt.subplots(1, len(previews), figsize=(3.2 * len(previews), 3.4), squeeze=False)
    for ax, (image, target, det) in zip(axes[0], previews):
        h, w = target["image_size"]
        shown = image[:, :h, :w]
        shown = ((shown - shown.amin()) / (shown.amax() - shown.amin()).clamp_min(1e-6) * 255).to(torch.uint8)
        keep = det["scores"] > min_score
        boxes = det["boxes"][keep].float()
        if keep.any():
            masks = paste_masks_in_image(det["masks"][keep].float(), boxes, (h, w))[:, 0] > 0.5
            shown = draw_segmentation_masks(shown, masks, alpha=0.45)
            shown = draw_bounding_boxes(shown, boxes, labels=[f"{c} {s:.2f}" for c, s in zip(
                det["labels"][keep].tolist(), det["scores"][keep].tolist())], width=1)
        ax.imshow(shown.permute(1, 2, 0).numpy())
        ax.set_title(f"image {target['image_id']}: {int(keep.sum())} detections > {min_score}", fontsize=8)
        ax.axis("off")
    return save_preview(fig, out_dir, step, dpi=100)
