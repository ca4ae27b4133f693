"""ImageFolder datamodule (ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg) with timm's transforms.

Batches travel as uint8 and are normalised, and randomly erased, on the device after the transfer, as timm's own
training script does (its prefetcher): a quarter of a float batch's bytes through the workers' shared memory, the
pinned copy and the bus. A worker gave a fifth more images a second on a 2-core machine, and the same within the
spread on an H200 host's 14, where decoding and RandAugment are the cost (docs/optimisation.md, steps 33 and 37).
"""
import functools
import math
import random
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import Compose

from vimexp import VimexpError
from vimexp.data import compat  # noqa: F401  (RandAugment on current Pillow)
from vimexp.data.sampling import ShardedDataModule, seeded
from vimexp.data.synthetic import ensure_imagefolder


class CheckedImageFolder(ImageFolder):
    """An ImageFolder whose unreadable files fail with their path and a fix, not a PIL traceback from a worker.

    Indexed with (index, epoch, salt) from an `EpochIndexSampler`, it draws the sample's augmentation from RNGs seeded
    by (seed, epoch, index, salt) alone, whatever else used the process's RNGs: a resumed run augments exactly as a
    straight one, and N processes exactly as one.
    """

    def __init__(self, root, transform=None, seed: int = 0):
        super().__init__(root, transform=transform, loader=self._load)
        self.seed = seed

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            return super().__getitem__(index)
        index, epoch, salt = index
        with seeded(self.seed, epoch, index, salt):
            return super().__getitem__(index)

    @staticmethod
    def _load(path):
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except Exception as e:
            raise VimexpError(f"can't read image {path} ({type(e).__name__}: {e}): delete or replace the file") from None


def check_layout(root: Path, splits=("train", "val")) -> list[str]:
    """Fail early, in one line, on a missing root, a missing or empty split, or splits with different classes."""
    if not root.is_dir():
        raise VimexpError(f"dataset root {root} does not exist: set data.root=/path/to/dataset "
                          "(with train/<class>/*.jpg and val/<class>/*.jpg)")
    classes = {}
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise VimexpError(f"dataset root {root} has no {split}/ folder: expected {split}/<class>/<image> "
                              "(the ImageNet ImageFolder layout)")
        classes[split] = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not classes[split]:
            raise VimexpError(f"{d} has no class folders: expected {split}/<class>/<image>")
        empty = next((c for c in classes[split] if not any(
            f.suffix.lower() in IMG_EXTENSIONS for f in (d / c).iterdir())), None)
        if empty:
            raise VimexpError(f"class folder {d / empty} holds no images: remove it or add images")
    first, *rest = splits
    for split in rest:
        if classes[split] != classes[first]:
            diff = sorted(set(classes[split]) ^ set(classes[first]))
            raise VimexpError(f"{split}/ and {first}/ have different classes ({len(classes[split])} vs "
                              f"{len(classes[first])}; first difference {diff[0]!r}): both need the same class folders")
    return classes[first]


class ImageFolderDataModule(ShardedDataModule):
    """Train/val loaders. `batch_size` is global: each of the trainer's processes loads batch_size / world_size.
    `mixup_group`: images per mixup draw (the task mixes), to whose groups repeated augmentation deals an image's
    copies (conf/data/imagenet.yaml)."""

    def __init__(self, root, num_classes, img_size=224, batch_size=1024, num_workers=8, generate=False,
                 generate_params=None, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, re_prob=0.25,
                 re_mode="pixel", re_count=1, hflip=0.5, scale=(0.08, 1.0), interpolation="bicubic",
                 crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), repeated_aug=True,
                 mixup_group=128, pin_memory=True, val_split="val", seed=0, rand_augment_on="workers",
                 resize_on="workers"):
        super().__init__()
        for name, where in (("rand_augment_on", rand_augment_on), ("resize_on", resize_on)):
            if where not in ("workers", "device"):
                raise VimexpError(f"data.{name}={where} is not a place: use workers or device")
        if resize_on == "device" and not (rand_augment_on == "device" and auto_augment):
            raise VimexpError("data.resize_on=device comes with RandAugment on the device: set "
                              "data.rand_augment_on=device (and data.auto_augment=rand-...), or data.resize_on=workers")
        self.save_hyperparameters(logger=False)
        self.root = Path(root)
        self._moments_on = self._erase_generator = None  # made on the batches' device at their first transfer
        self._apply_records = None  # data.rand_augment_on=device's (Triton's kernels: imported only for it)
        self._resize_crops = None  # data.resize_on=device's

    def prepare_data(self):  # rank 0 only: make the built-in dataset once
        if self.hparams.generate:
            ensure_imagefolder(self.root, **(self.hparams.generate_params or {}))

    def setup(self, stage=None):
        h = self.hparams
        val_split = h.val_split
        classes = check_layout(self.root, ("train", val_split))
        if len(classes) != h.num_classes:
            raise VimexpError(f"{self.root} has {len(classes)} classes but data.num_classes={h.num_classes}: "
                              f"set data.num_classes={len(classes)}")
        # use_prefetcher: timm's transforms up to a uint8 tensor (the mean still sets RandAugment's fill colour);
        # normalising and erasing are on_after_batch_transfer's
        common = dict(input_size=h.img_size, interpolation=h.interpolation, mean=h.mean, std=h.std, use_prefetcher=True)
        train_tf = create_transform(**common, is_training=True, scale=tuple(h.scale), hflip=h.hflip,
                                    color_jitter=h.color_jitter, auto_augment=h.auto_augment)
        train_tf = Compose([*train_tf.transforms, EraseBoxes(h.re_prob, h.re_count)])
        if h.rand_augment_on == "device" and h.auto_augment:  # the workers draw RandAugment's ops, the device applies them
            from vimexp.data.device_augment import GraphedRecords, RecordedRandAugment, collate_crops, resize_crops
            train_tf = RecordedRandAugment(train_tf, resize_on_device=h.resize_on == "device")
            self._apply_records = GraphedRecords()
            if h.resize_on == "device":  # the crops, of different sizes, travel end to end
                size = tuple(h.img_size) if isinstance(h.img_size, (list, tuple)) else (h.img_size, h.img_size)
                self.collate_fn, self._resize_crops = collate_crops, functools.partial(resize_crops, size=size)
        eval_tf = create_transform(**common, is_training=False, crop_pct=h.crop_pct)
        self.train_set = CheckedImageFolder(self.root / "train", train_tf, seed=self.hparams.seed)
        self.val_set = CheckedImageFolder(self.root / val_split, eval_tf)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        images, targets = batch
        if isinstance(images, (list, tuple)):  # training: boxes read here, so that the device never syncs
            images, boxes, *records = images  # records: data.rand_augment_on=device's
            return images, targets, boxes.tolist(), records[0] if records else None
        return images, targets, None, None

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, targets, boxes, records = batch
        if isinstance(images, dict):  # data.resize_on=device's crops
            images = self._resize_crops(images)
        if records is not None:
            images = self._apply_records(images, records)
        mean, std = self._moments(images.device)
        images = (images.float() - mean) / std
        if boxes:
            erase(images, boxes, self.hparams.re_mode, self._generator(images.device))
        if self.trainer is not None:  # Lightning converted the batch before the transfer, when it was still uint8
            images = self.trainer.precision_plugin.convert_input(images)  # float32 but for *-true precisions
        return images, targets

    def _moments(self, device):
        """mean and std x 255 as (C, 1, 1) tensors on `device`, made once (a host-to-device copy a batch would sync)."""
        if self._moments_on is None or self._moments_on[0] != device:
            h = self.hparams
            self._moments_on = device, *(255 * torch.tensor(v, device=device)[:, None, None] for v in (h.mean, h.std))
        return self._moments_on[1:]

    def _generator(self, device):
        if self._erase_generator is None or self._erase_generator.device != device:
            self._erase_generator = torch.Generator(device=device)
        return self._erase_generator


ERASE_MODES = ("pixel", "rand", "const")  # timm's: noise per pixel, one random colour a box, zeros (data.re_mode)


def check_erase_mode(mode: str) -> None:
    if mode not in ERASE_MODES:
        raise VimexpError(f"data.re_mode={mode} is not an erasing mode: use one of {', '.join(ERASE_MODES)}")


class EraseBoxes:
    """The worker's half of random erasing (timm's RandomErasing, DeiT's re_prob / re_count): where to erase a
    (C, H, W) image, drawn from the sample's seeded RNG, and a seed for the fill, as `(image, boxes)` with boxes
    (count, 5) int64 rows of (top, left, height, width, seed), height 0 for none. `erase` fills them on the device.
    Written here because timm's erases in the same call that draws: its boxes can't travel without the image."""

    def __init__(self, probability: float, count: int = 1, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), attempts=10):
        self.probability, self.count, self.area, self.attempts = probability, count or 1, area, attempts
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, image: torch.Tensor):
        boxes = torch.zeros(self.count, 5, dtype=torch.int64)
        if self.probability > 0 and not random.random() > self.probability:  # timm's test, timm's draws in its order
            _, height, width = image.shape
            n = 1 if self.count == 1 else random.randint(1, self.count)
            for k in range(n):
                for _ in range(self.attempts):
                    area = random.uniform(*self.area) * (height * width) / n
                    aspect = math.exp(random.uniform(*self.log_aspect))
                    h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                    if h < height and w < width:
                        boxes[k, :4] = torch.tensor([random.randint(0, height - h), random.randint(0, width - w), h, w])
                        break
            boxes[:, 4] = torch.tensor([random.getrandbits(63) for _ in range(self.count)])  # after every box's draws
        return image, boxes


def erase(images: torch.Tensor, boxes: list, mode: str, generator: torch.Generator) -> None:
    """Fill each image's boxes (EraseBoxes' rows, as lists) in place with normal noise drawn from the box's own
    seed: per pixel ('pixel'), one colour a box ('rand'), or zeros ('const'). Normalised images: noise ~ N(0, 1)."""
    check_erase_mode(mode)
    channels = images.shape[1]
    for i, rows in enumerate(boxes):
        for top, left, h, w, seed in rows:
            if not h:
                continue
            if mode == "const":
                fill = 0.0
            else:
                shape = (channels, h, w) if mode == "pixel" else (channels, 1, 1)
                fill = torch.randn(shape, generator=generator.manual_seed(seed), device=images.device,
                                   dtype=images.dtype)
            images[i, :, top:top + h, left:left + w] = fill
