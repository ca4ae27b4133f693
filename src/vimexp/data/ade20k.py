"""ADE20K semantic segmentation (ADEChallengeData2016/{images,annotations}/{training,validation}) with the pipeline of
the official Vim (MMSeg 0.x) configs:

train: rescale into (2048, 512) x ratio 0.5-2.0 keeping the aspect ratio -> random 512 crop, retried until no class
       covers more than 75% of it -> flip -> photometric distortion (MMSeg's, or torchvision's) -> normalise -> pad to
       512 (label padding ignored)
val:   rescale into (2048, 512) (short side 512) -> normalise; labels stay at full resolution and the task predicts
       with sliding windows (crop 512, stride 341) and resizes the logits back.
Annotations hold 0 ("other") and 1..150; the usual shift makes them 0..149 and 0 becomes 255, ignored.
"""
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
from vimexp.data.synthetic import ensure_ade20k

IGNORE = 255
PHOTOMETRIC = ("mmseg", "torchvision")


def rgb_to_hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(3, H, W) RGB in [0, 255] -> hue in degrees [0, 360), saturation in [0, 1], value in [0, 255]."""
    r, g, b = img.unbind(0)
    value, chroma = img.amax(0), img.amax(0) - img.amin(0)
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    sat = torch.where(value > 0, chroma / value.clamp_min(1e-12), torch.zeros_like(value))
    return torch.where(chroma > 0, hue * 60, torch.zeros_like(hue)), sat, value


def hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_hsv: channel n is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + hue / 60) mod 6."""
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype).view(3, 1, 1) + hue / 60) % 6
    return value - value * sat * torch.minimum(k, 4 - k).clamp(0, 1)


class MMSegPhotometric:
    """MMSeg 0.x's PhotoMetricDistortion (the official Vim pipeline), written from its documented behaviour, on RGB
    values in [0, 255]: brightness + U(-32, 32); then, in a random order (a fair coin), contrast x U(0.5, 1.5) either
    before or after saturation x U(0.5, 1.5) and a hue shift of 2 x randint(-18, 17) degrees (OpenCV's 0-180 hue
    units), both done in HSV; each of the four applied with probability 0.5, values clipped after each. Unlike
    torchvision's (multiplicative brightness, contrast towards the mean grey, a channel permutation) it adds to
    brightness, scales contrast about 0 and never swaps channels. MMSeg rounds to uint8 after each step; this stays in
    float."""

    def __init__(self, brightness_delta: float = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18):
        self.brightness_delta, self.contrast_range = brightness_delta, tuple(contrast_range)
        self.saturation_range, self.hue_delta = tuple(saturation_range), hue_delta

    def sample(self, rng=random) -> dict:
        """The random draws, in MMSeg's order: brightness, the order coin, contrast (if first), saturation, hue,
        contrast (if last); None where a step is skipped."""
        coin = lambda: rng.random() < 0.5  # noqa: E731
        brightness = rng.uniform(-self.brightness_delta, self.brightness_delta) if coin() else None
        contrast_first = coin()
        contrast = rng.uniform(*self.contrast_range) if contrast_first and coin() else None
        saturation = rng.uniform(*self.saturation_range) if coin() else None
        hue = rng.randrange(-self.hue_delta, self.hue_delta) if coin() else None  # numpy's randint: high excluded
        if not contrast_first:
            contrast = rng.uniform(*self.contrast_range) if coin() else None
        return dict(brightness=brightness, contrast=contrast, contrast_first=contrast_first, saturation=saturation,
                    hue=hue)

    @staticmethod
    def apply(img: torch.Tensor, p: dict) -> torch.Tensor:
        """img (3, H, W) RGB in [0, 255] (any dtype) -> float32 in [0, 255], the draws `p` of sample()."""
        img = img.float()
        if p["brightness"] is not None:
            img = (img + p["brightness"]).clamp(0, 255)
        if p["contrast_first"] and p["contrast"] is not None:
            img = (img * p["contrast"]).clamp(0, 255)
        if p["saturation"] is not None or p["hue"] is not None:  # one HSV round trip: in float it is exact
            hue, sat, value = rgb_to_hsv(img)
            if p["saturation"] is not None:
                sat = (sat * p["saturation"]).clamp(0, 1)
            if p["hue"] is not None:
                hue = (hue + 2 * p["hue"]) % 360
            img = hsv_to_rgb(hue, sat, value)
        if not p["contrast_first"] and p["contrast"] is not None:
            img = (img * p["contrast"]).clamp(0, 255)
        return img

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.apply(img, self.sample())


def rescale_size(height: int, width: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """MMSeg's keep-ratio Resize: the largest size whose long side fits scale[0] * ratio and short side scale[1] * ratio."""
    factor = min(max(scale) * ratio / max(height, width), min(scale) * ratio / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class TrainTransform:
    def __init__(self, crop_size=512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip=0.5,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), photometric="mmseg"):
        self.crop, self.scale, self.ratio_range, self.cat_max_ratio, self.flip = crop_size, scale, ratio_range, \
            cat_max_ratio, flip
        if photometric not in PHOTOMETRIC:
            raise VimexpError(f"unknown data.photometric {photometric!r}: choose one of {', '.join(PHOTOMETRIC)}")
        # torchvision's: brightness, contrast, saturation, hue and a channel permutation each with probability 0.5,
        # hue by up to 0.1 of the circle (MMSeg's 18 of OpenCV's 180), brightness x(1 +- 1/8) (MMSeg adds +-32)
        self.photometric = MMSegPhotometric() if photometric == "mmseg" else \
            T.RandomPhotometricDistort(hue=(-0.1, 0.1), p=0.5)
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, label: np.ndarray):
        img, lab = tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(label)[None])
        size = rescale_size(*img.shape[-2:], self.scale, random.uniform(*self.ratio_range))
        img = TF.resize(img, list(size), antialias=True)
        lab = TF.resize(lab, list(size), interpolation=T.InterpolationMode.NEAREST)
        top, left = self._crop_origin(lab[0])
        img = img[..., top:top + self.crop, left:left + self.crop]
        lab = lab[..., top:top + self.crop, left:left + self.crop]
        if random.random() < self.flip:
            img, lab = img.flip(-1), lab.flip(-1)
        img = (self.photometric(img.as_subclass(torch.Tensor)).float() / 255 - self.mean) / self.std
        pad = [0, 0, self.crop - img.shape[-1], self.crop - img.shape[-2]]  # left, top, right, bottom
        return TF.pad(img, pad, fill=0.0), TF.pad(lab, pad, fill=IGNORE)[0].long()

    def _crop_origin(self, lab: torch.Tensor) -> tuple[int, int]:
        """A random crop; up to 10 tries for one where no class covers more than cat_max_ratio of the labelled pixels."""
        h, w = lab.shape
        for _ in range(10):
            top, left = random.randint(0, max(h - self.crop, 0)), random.randint(0, max(w - self.crop, 0))
            window = lab[top:top + self.crop, left:left + self.crop]
            counts = torch.unique(window[window != IGNORE], return_counts=True)[1]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return top, left


class EvalTransform:
    def __init__(self, scale=(2048, 512), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        self.scale = scale
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __call__(self, image: Image.Image, label: np.ndarray):
        img = TF.pil_to_tensor(image)
        img = TF.resize(img, list(rescale_size(*img.shape[-2:], self.scale)), antialias=True)
        return (img.float() / 255 - self.mean) / self.std, torch.from_numpy(label).long()


class ADE20K(SeededDataset):
    """(image, label) pairs of one split; labels shifted (0 -> 255 ignored, k -> k - 1) and range-checked."""

    def __init__(self, root, split: str, num_classes: int = 150, transform=None, seed: int = 0):
        self.root, self.num_classes, self.transform, self.seed = Path(root), num_classes, transform, seed
        images, annotations = self.root / "images" / split, self.root / "annotations" / split
        for d in (images, annotations):
            if not d.is_dir():
                raise VimexpError(f"ADE20K root {self.root} has no {d.relative_to(self.root)}/: set data.root to the "
                                  "ADEChallengeData2016 folder (images/{training,validation}, annotations/...)")
        self.images = sorted(images.glob("*.jpg"))
        if not self.images:
            raise VimexpError(f"{images} holds no .jpg images")
        self.labels = [annotations / f"{p.stem}.png" for p in self.images]
        missing = [p for p in self.labels if not p.is_file()]
        if missing:
            raise VimexpError(f"{len(missing)} image(s) of {images} have no annotation, e.g. {missing[0]}: "
                              "each images/<split>/X.jpg needs annotations/<split>/X.png")

    def __len__(self):
        return len(self.images)

    def load(self, index) -> tuple[Image.Image, np.ndarray]:
        try:
            image = Image.open(self.images[index]).convert("RGB")
            label = np.asarray(Image.open(self.labels[index]))
        except Exception as e:
            raise VimexpError(f"can't read {self.images[index]} or its annotation ({type(e).__name__}: {e}): "
                              "delete or replace the pair") from None
        if label.ndim != 2 or label.shape != (image.height, image.width):
            raise VimexpError(f"annotation {self.labels[index]} is {label.shape}, its image {image.height}x"
                              f"{image.width}: annotations are single-channel PNGs of class ids, the image's size")
        if label.max() > self.num_classes:
            raise VimexpError(f"annotation {self.labels[index]} holds class {label.max()} but data.num_classes="
                              f"{self.num_classes}: ADE20K annotations hold 0 (ignored) and 1..num_classes")
        shifted = label.astype(np.int64) - 1
        shifted[shifted < 0] = IGNORE
        return image, shifted.astype(np.uint8)


class ADE20KDataModule(ShardedDataModule):
    val_batch_size = 1  # whole images of different sizes, predicted window by window

    def __init__(self, root, num_classes=150, batch_size=32, num_workers=8, crop_size=512, scale=(2048, 512),
                 ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip=0.5, mean=(0.485, 0.456, 0.406),
                 std=(0.229, 0.224, 0.225), generate=False, generate_params=None, pin_memory=True,
                 val_split="validation", seed=0, photometric="mmseg"):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)

    def prepare_data(self):  # rank 0 only: the built-in dataset, once
        if self.hparams.generate:
            ensure_ade20k(self.root.parent, **(self.hparams.generate_params or {}))

    def setup(self, stage=None):
        h = self.hparams
        norm = dict(mean=tuple(h.mean), std=tuple(h.std))
        train_tf = TrainTransform(h.crop_size, tuple(h.scale), tuple(h.ratio_range), h.cat_max_ratio, h.flip, **norm,
                                  photometric=h.photometric)
        self.train_set = ADE20K(self.root, "training", h.num_classes, train_tf, seed=h.seed)
        self.val_set = ADE20K(self.root, h.val_split, h.num_classes, EvalTransform(tuple(h.scale), **norm))
