"""Cascade Mask R-CNN on a plain backbone, as the official Vim-Det / ViTDet configs build it: backbone -> ViTDet's
simple feature pyramid from its last layer -> RPN -> three cascade box stages -> mask head. Built from torchvision's
detection parts (anchors, RPN, RoIAlign, box coding, matching, sampling, NMS, mask loss); the cascade, which
torchvision lacks, is here."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image

from vimexp.models.backbone import intermediate_maps, num_layers
from vimexp.models.dense.necks import ViTDetPyramid

LEVELS = ["p2", "p3", "p4", "p5"]  # RoIAlign's levels; p6 feeds the RPN only


class CascadeStage(nn.Module):
    """One box stage: its own IoU threshold for foreground and its own box-delta weights, a 4-conv + 1-fc head with
    LayerNorm, a classifier over C + 1 classes (0 = background) and class-agnostic box regression."""

    def __init__(self, channels: int, num_classes: int, iou: float, weights, convs: int = 4, fc_dim: int = 1024):
        super().__init__()
        self.matcher = det_utils.Matcher(iou, iou, allow_low_quality_matches=False)
        self.coder = det_utils.BoxCoder(tuple(weights))
        self.head = FastRCNNConvFCHead((channels, 7, 7), [channels] * convs, [fc_dim], norm_layer=LayerNorm2d)
        self.cls_score, self.bbox_pred = nn.Linear(fc_dim, num_classes + 1), nn.Linear(fc_dim, 4)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):  # detectron2's initialisation
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(pooled)
        return self.cls_score(x), self.bbox_pred(x)

    def assign(self, proposals: list[torch.Tensor], targets: list[dict]) -> tuple[list, list]:
        """Per image: the index of each proposal's ground-truth box (-1 below this stage's IoU) and its label."""
        matched, labels = [], []
        for boxes, target in zip(proposals, targets):
            if len(target["boxes"]) == 0:  # every proposal is background
                idx = torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
                lab = torch.zeros_like(idx)
            else:
                idx = self.matcher(box_iou(target["boxes"], boxes))
                lab = target["labels"][idx.clamp(min=0)] * (idx >= 0)
            matched.append(idx)
            labels.append(lab)
        return matched, labels

    def loss(self, logits, deltas, proposals, matched, labels, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over all sampled proposals; L1 on the foreground's box deltas, divided by all of them
        (detectron2's smooth-L1 with beta 0)."""
        labels_cat = torch.cat(labels)
        fg = labels_cat > 0
        gt = torch.cat([t["boxes"][m.clamp(min=0)] if len(t["boxes"]) else torch.zeros(len(m), 4, device=m.device)
                        for t, m in zip(targets, matched)])  # background rows are placeholders, never used
        goal = self.coder.encode_single(gt[fg], torch.cat(proposals)[fg])
        box_loss = F.l1_loss(deltas[fg], goal, reduction="sum") / max(labels_cat.numel(), 1)
        return F.cross_entropy(logits, labels_cat), box_loss


class CascadeMaskRCNN(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 256,
                 anchor_sizes=(32, 64, 128, 256, 512), stage_ious=(0.5, 0.6, 0.7),
                 stage_weights=((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)), fc_dim: int = 1024,
                 roi_per_image: int = 512, positive_fraction: float = 0.25, rpn_pre_nms=(2000, 1000),
                 rpn_post_nms=(1000, 1000), score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100):
        super().__init__()
        self.backbone, self.neck = backbone, ViTDetPyramid(backbone.embed_dim, channels)
        self.last_layer = num_layers(backbone) - 1
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, 3, conv_depth=2), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
            batch_size_per_image=256, positive_fraction=0.5, nms_thresh=0.7,
            pre_nms_top_n=dict(training=rpn_pre_nms[0], testing=rpn_pre_nms[1]),
            post_nms_top_n=dict(training=rpn_post_nms[0], testing=rpn_post_nms[1]))
        self.box_pool = MultiScaleRoIAlign(LEVELS, output_size=7, sampling_ratio=0)
        self.stages = nn.ModuleList(CascadeStage(channels, num_classes, iou, w, fc_dim=fc_dim)
                                    for iou, w in zip(stage_ious, stage_weights))
        self.sampler = det_utils.BalancedPositiveNegativeSampler(roi_per_image, positive_fraction)
        self.mask_pool = MultiScaleRoIAlign(LEVELS, output_size=14, sampling_ratio=0)
        self.mask_head = MaskRCNNHeads(channels, [channels] * 4, 1, norm_layer=LayerNorm2d)
        self.mask_predictor = MaskRCNNPredictor(channels, channels, num_classes + 1)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    def forward(self, images: torch.Tensor, targets: list[dict]):
        """Training: a dict of losses. Evaluation: per image boxes (in the input's pixels), scores, labels and mask
        probabilities (n, 1, 28, 28) in their boxes. `targets` give each image's valid size (`image_size`), and the
        ground truth (boxes xyxy, labels 1..C, masks) in training."""
        sizes = [tuple(t["image_size"]) for t in targets]
        features = self.neck(intermediate_maps(self.backbone, images, [self.last_layer])[0])
        proposals, losses = self.rpn(ImageList(images, sizes), features, targets if self.training else None)
        if self.training:
            return {**losses, **self._train_heads(features, proposals, sizes, targets)}
        return self._detect(features, proposals, sizes)

    def _stage_outputs(self, stage, features, boxes, sizes):
        pooled = self.box_pool(features, boxes, sizes)
        scale = 1.0 / len(self.stages)  # detectron2 scales each stage's gradient into the shared features by 1/3
        return stage(pooled * scale + pooled.detach() * (1 - scale))

    def _train_heads(self, features, proposals, sizes, targets) -> dict:
        losses = {}
        # stage 1 learns from sampled RPN proposals with the ground-truth boxes added; later stages from the boxes
        # the stage before predicted for those same proposals, relabelled at their own, stricter threshold
        boxes = [torch.cat([p.detach(), t["boxes"]]) for p, t in zip(proposals, targets)]
        matched, labels = self.stages[0].assign(boxes, targets)
        keep = [torch.where(pos | neg)[0] for pos, neg in zip(*self.sampler(labels))]
        boxes, matched, labels = ([x[k] for x, k in zip(xs, keep)] for xs in (boxes, matched, labels))
        first = (boxes, matched, labels)
        for k, stage in enumerate(self.stages):
            if k:
                boxes = [clip_boxes_to_image(b.detach(), s) for b, s in zip(boxes, sizes)]
                matched, labels = stage.assign(boxes, targets)
            logits, deltas = self._stage_outputs(stage, features, boxes, sizes)
            losses[f"loss_cls_{k}"], losses[f"loss_box_{k}"] = stage.loss(logits, deltas, boxes, matched, labels,
                                                                          targets)
            boxes = stage.coder.decode_single(deltas, torch.cat(boxes)).split([len(b) for b in boxes])
        boxes, matched, labels = first  # the mask head learns from stage 1's foreground (detectron2's cascade)
        fg = [lab > 0 for lab in labels]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_pool(
            features, [b[f] for b, f in zip(boxes, fg)], sizes)))
        losses["loss_mask"] = maskrcnn_loss(mask_logits, [b[f] for b, f in zip(boxes, fg)],
                                            [t["masks"] for t in targets], [t["labels"] for t in targets],
                                            [m[f] for m, f in zip(matched, fg)])
        return losses

    @torch.no_grad()
    def _detect(self, features, proposals, sizes) -> list[dict]:
        boxes, scores = proposals, []
        for stage in self.stages:
            logits, deltas = self._stage_outputs(stage, features, boxes, sizes)
            scores.append(F.softmax(logits.float(), -1))
            decoded = stage.coder.decode_single(deltas.float(), torch.cat(boxes).float())
            boxes = [clip_boxes_to_image(b, s) for b, s in zip(decoded.split([len(b) for b in boxes]), sizes)]
        mean_scores = torch.stack(scores).mean(0).split([len(b) for b in boxes])  # the three stages' average
        detections = [self._per_class_nms(b, s) for b, s in zip(boxes, mean_scores)]
        probs = maskrcnn_inference(self.mask_predictor(self.mask_head(self.mask_pool(
            features, [d["boxes"] for d in detections], sizes))), [d["labels"] for d in detections])
        for d, p in zip(detections, probs):
            d["masks"] = p
        return detections

    def _per_class_nms(self, boxes: torch.Tensor, scores: torch.Tensor) -> dict:
        num_classes = scores.shape[1] - 1
        scores = scores[:, 1:].flatten()
        labels = torch.arange(1, num_classes + 1, device=boxes.device).repeat(len(boxes))
        boxes = boxes.repeat_interleave(num_classes, 0)
        keep = torch.where((scores > self.score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
        keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_thresh)][:self.detections_per_img]
        return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
