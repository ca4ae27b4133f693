"""COCO detection and instance segmentation (annotations/instances_<split>.json + <split>/ images) with the pipeline
of the official ViTDet / Vim-Det configs:

train: flip -> large-scale jitter (rescale to fit size x 0.1-2.0, aspect kept) -> random crop of at most size x size
       -> boxes clipped, and objects left without box or mask dropped; images without objects are skipped -> padded to
       size x size at the bottom and right after normalising (0 = the mean colour), as detectron2 batches images
val:   rescale to fit size x size (the short side to `size` unless the long side would pass it) -> pad to size x size;
       predictions are mapped back to the original image and scored with pycocotools against the annotation file.
Masks come as polygons or RLE (pycocotools decodes both); crowd annotations are left out of training.
"""
import contextlib
import io
import math
import random
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import tv_tensors

from vimexp import VimexpError
from vimexp.data.sampling import SeededDataset, ShardedDataModule
from vimexp.data.synthetic import ensure_coco

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6]
AREAS = {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, float("inf"))}  # COCOeval's object area ranges
LSJ_PAD = ("bottom_right", "random_black")


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress on every call


def fixed_size_crop(img, target: dict, size: int, rng=random) -> tuple:
    """detectron2's FixedSizeCrop(pad=False), the ViTDet LSJ crop: a size x size window (smaller where the image is),
    its offset one uniform fraction of the slack on both axes; image, boxes and masks alike."""
    h, w = img.shape[-2:]
    ch, cw, u = min(h, size), min(w, size), rng.random()
    top, left = round((h - ch) * u), round((w - cw) * u)
    crop = lambda x: TF.crop(x, top, left, ch, cw)  # noqa: E731
    return crop(img), {**target, "boxes": crop(target["boxes"]), "masks": crop(target["masks"])}


class TrainTransform:
    def __init__(self, size=1024, scale_range=(0.1, 2.0), flip=0.5, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), pad="bottom_right"):
        if pad not in LSJ_PAD:
            raise VimexpError(f"unknown data.lsj_pad {pad!r}: choose one of {', '.join(LSJ_PAD)}")
        self.size, self.pad = size, pad
        self.jitter = T.Compose([T.RandomHorizontalFlip(flip),
                                 T.ScaleJitter((size, size), scale_range=tuple(scale_range), antialias=True)])
        # random_black: torchvision's crop pads both sides with black (0 before normalising) and crops at random
        self.crop = None if pad == "bottom_right" else T.RandomCrop(size, pad_if_needed=True)
        self.clean = T.Compose([
            T.ClampBoundingBoxes(),
            T.SanitizeBoundingBoxes(labels_getter=lambda sample: (sample[1]["labels"], sample[1]["masks"]))])
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, target: dict):
        img = tv_tensors.Image(TF.pil_to_tensor(image))
        h, w = img.shape[-2:]
        target = {"boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w)),
                  "labels": target["labels"], "masks": tv_tensors.Mask(target["masks"]),
                  "image_id": target["image_id"]}
        img, target = self.jitter(img, target)
        img, target = self.crop(img, target) if self.crop else fixed_size_crop(img, target, self.size)
        img, target = self.clean(img, target)
        keep = target["masks"].flatten(1).amax(1) > 0  # a box can outlive its mask at the crop's edge
        h, w = img.shape[-2:]
        pad = [0, 0, self.size - w, self.size - h]  # left, top, right, bottom; none for random_black
        masks = TF.pad(target["masks"].as_subclass(torch.Tensor)[keep], pad)
        out = {"boxes": target["boxes"].as_subclass(torch.Tensor)[keep].float(), "labels": target["labels"][keep],
               "masks": masks, "image_id": target["image_id"], "image_size": (h, w), "scale": 1.0}
        return TF.pad((img.as_subclass(torch.Tensor).float() / 255 - self.mean) / self.std, pad), out


class EvalTransform:
    def __init__(self, size=1024, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.size = size
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, target: dict):
        img = TF.pil_to_tensor(image)
        h, w = img.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = min(self.size, round(h * scale)), min(self.size, round(w * scale))
        img = (TF.resize(img, [nh, nw], antialias=True).float() / 255 - self.mean) / self.std
        img = TF.pad(img, [0, 0, self.size - nw, self.size - nh])
        return img, {"image_id": target["image_id"], "image_size": (nh, nw), "scale": scale, "orig_size": (h, w)}


class CocoDetection(SeededDataset):
    """(image, target) pairs of one split; categories mapped to 1..C in id order (0 is the background)."""

    def __init__(self, root, split: str, transform=None, train: bool = False, seed: int = 0,
                 skip_degenerate: bool = False):
        from pycocotools.coco import COCO

        self.root, self.transform, self.seed = Path(root), transform, seed
        ann_file, self.image_dir = self.root / "annotations" / f"instances_{split}.json", self.root / split
        if not ann_file.is_file():
            raise VimexpError(f"COCO root {self.root} has no annotations/instances_{split}.json: set data.root to the "
                              "folder holding annotations/ and the image folders (train2017/, val2017/)")
        if not self.image_dir.is_dir():
            raise VimexpError(f"COCO root {self.root} has no {split}/ image folder beside annotations/")
        try:
            with _quiet():
                self.coco = COCO(str(ann_file))
        except Exception as e:
            raise VimexpError(f"can't read {ann_file} ({type(e).__name__}: {e}): is it a COCO instances file?") from None
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self._check(ann_file, skip_degenerate)
        self.ids = sorted(self.coco.imgs)
        if train:  # detectron2's FILTER_EMPTY_ANNOTATIONS: an image without objects teaches the detector nothing
            self.ids = [i for i in self.ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns[i])]
        if not self.ids:
            raise VimexpError(f"{ann_file} lists no images{' with objects' if train else ''}")

    def _check(self, ann_file: Path, skip_degenerate: bool):
        for ann in list(self.coco.anns.values()):
            if ann["image_id"] not in self.coco.imgs:
                raise VimexpError(f"{ann_file}: annotation {ann['id']} points at image {ann['image_id']}, which the "
                                  "file does not list: fix or remove the annotation")
            x, y, w, h = ann["bbox"]
            if not (all(map(math.isfinite, ann["bbox"])) and w > 0 and h > 0):
                if skip_degenerate:
                    self.coco.imgToAnns[ann["image_id"]].remove(ann)
                    continue
                raise VimexpError(f"{ann_file}: annotation {ann['id']} (image {ann['image_id']}) has a degenerate box "
                                  f"{ann['bbox']}: width and height must be > 0; fix it, or set "
                                  "data.skip_degenerate=true to leave such annotations out")
        missing = [img["file_name"] for img in self.coco.imgs.values()
                   if not (self.image_dir / img["file_name"]).is_file()]
        if missing:
            raise VimexpError(f"{ann_file} lists {len(missing)} image(s) missing from {self.image_dir}, e.g. "
                              f"{missing[0]}: copy them there or remove them from the annotations")

    def __len__(self):
        return len(self.ids)

    def load(self, index) -> tuple[Image.Image, dict]:
        """The image and its non-crowd objects: boxes (N, 4) xyxy in pixels, labels (N,) in 1..C, masks (N, H, W)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except Exception as e:
            raise VimexpError(f"can't read {path} ({type(e).__name__}: {e}): replace it or remove it from the "
                              "annotations") from None
        if (image.height, image.width) != (info["height"], info["width"]):
            raise VimexpError(f"{path} is {image.height}x{image.width} but the annotations say {info['height']}x"
                              f"{info['width']}: the image does not belong to these annotations")
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, *image.size[::-1]), np.uint8)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                        dtype=torch.int64),
                  "masks": torch.from_numpy(masks), "image_id": image_id}
        return image, target


def collate(batch):
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def coco_results(coco_gt, detections: list[dict], iou_type: str) -> dict[str, float]:
    """COCO AP, AP50, AP75, APs, APm, APl (in %) of `detections` (loadRes format) against `coco_gt`. No detections
    score 0; an area range without ground truth objects (COCOeval's -1) is left out."""
    from pycocotools.cocoeval import COCOeval

    if not detections:  # COCOeval can't load an empty result list: 0 where there was something to find
        areas = [a["area"] for a in coco_gt.anns.values() if not a.get("iscrowd", 0)]
        holds = lambda k: k not in AREAS or any(AREAS[k][0] <= a < AREAS[k][1] for a in areas)  # noqa: E731
        return {k: 0.0 for k in METRICS if holds(k)}
    with _quiet():
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) * 100 for k, v in zip(METRICS, evaluator.stats[:6]) if v >= 0}


class CocoDataModule(ShardedDataModule):
    collate_fn = staticmethod(collate)

    def __init__(self, root, num_classes=80, batch_size=64, num_workers=8, size=1024, scale_range=(0.1, 2.0),
                 flip=0.5, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), skip_degenerate=False,
                 generate=False, generate_params=None, pin_memory=True, train_split="train2017",
                 val_split="val2017", val_batch_size=None, seed=0, lsj_pad="bottom_right"):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self.val_batch_size = val_batch_size

    def prepare_data(self):  # rank 0 only: the built-in dataset, once
        if self.hparams.generate:
            ensure_coco(self.root, **(self.hparams.generate_params or {}))

    def setup(self, stage=None):
        h = self.hparams
        norm = dict(mean=tuple(h.mean), std=tuple(h.std))
        self.val_set = CocoDetection(self.root, h.val_split, EvalTransform(h.size, **norm),
                                     skip_degenerate=h.skip_degenerate)
        if len(self.val_set.cat_ids) != h.num_classes:
            raise VimexpError(f"{self.root} has {len(self.val_set.cat_ids)} categories but data.num_classes="
                              f"{h.num_classes}: set data.num_classes={len(self.val_set.cat_ids)}")
        if stage in (None, "fit"):
            train_tf = TrainTransform(h.size, h.scale_range, h.flip, **norm, pad=h.lsj_pad)
            self.train_set = CocoDetection(self.root, h.train_split, train_tf, train=True, seed=h.seed,
                                           skip_degenerate=h.skip_degenerate)
