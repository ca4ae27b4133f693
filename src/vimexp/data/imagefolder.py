"""ImageFolder datamodule (ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg) with timm's transforms."""
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from vimexp import VimexpError
from vimexp.data import compat  # noqa: F401  (RandAugment on current Pillow)
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
        py_state, np_state = random.getstate(), np.random.get_state()  # timm draws from torch, random and numpy
        with torch.random.fork_rng(devices=[]):
            sample_seed = hash((self.seed, epoch, index, salt)) % 2**32
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            try:
                return super().__getitem__(index)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    @staticmethod
    def _load(path):
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except Exception as e:
            raise VimexpError(f"can't read image {path} ({type(e).__name__}: {e}): delete or replace the file") from None


class EpochIndexSampler(torch.utils.data.Sampler):
    """Wraps a sampler to yield (index, epoch, salt), so that the dataset can seed each sample's augmentation.

    The salt is (-1, -1), unless `rank` is given for a sampler that yields an image more than once per epoch (repeated
    augmentation): then it is (rank, position), so that each copy is augmented differently. Only ints: their hash is
    the same in every process (None's is not, before Python 3.12).
    """

    def __init__(self, sampler, rank: int | None = None):
        self.sampler, self.epoch, self.rank = sampler, 0, rank

    def set_epoch(self, epoch: int):
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        if self.rank is None:
            return ((i, self.epoch, (-1, -1)) for i in self.sampler)
        return ((i, self.epoch, (self.rank, pos)) for pos, i in enumerate(self.sampler))

    def __len__(self):
        return len(self.sampler)


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


class ImageFolderDataModule(L.LightningDataModule):
    """Train/val loaders. `batch_size` is global: each of the trainer's processes loads batch_size / world_size."""

    def __init__(self, root, num_classes, img_size=224, batch_size=1024, num_workers=8, generate=False,
                 generate_params=None, auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, re_prob=0.25,
                 re_mode="pixel", re_count=1, hflip=0.5, scale=(0.08, 1.0), interpolation="bicubic",
                 crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), repeated_aug=True,
                 pin_memory=True, val_split="val", seed=0):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root)

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
        common = dict(input_size=h.img_size, interpolation=h.interpolation, mean=h.mean, std=h.std)
        train_tf = create_transform(**common, is_training=True, scale=tuple(h.scale), hflip=h.hflip,
                                    color_jitter=h.color_jitter, auto_augment=h.auto_augment, re_prob=h.re_prob,
                                    re_mode=h.re_mode, re_count=h.re_count)
        eval_tf = create_transform(**common, is_training=False, crop_pct=h.crop_pct)
        self.train_set = CheckedImageFolder(self.root / "train", train_tf, seed=self.hparams.seed)
        self.val_set = CheckedImageFolder(self.root / val_split, eval_tf)

    @property
    def per_device_batch(self) -> int:
        world = self.trainer.world_size if self.trainer else 1
        if self.hparams.batch_size % world:
            raise VimexpError(f"data.batch_size={self.hparams.batch_size} (global) does not split over {world} "
                              "processes: make it a multiple of the number of devices x nodes")
        return self.hparams.batch_size // world

    def _loader(self, dataset, train, sampler=None):
        h = self.hparams
        return DataLoader(dataset, batch_size=self.per_device_batch, shuffle=train and sampler is None,
                          sampler=sampler, num_workers=h.num_workers, pin_memory=h.pin_memory and torch.cuda.is_available(),
                          drop_last=train, persistent_workers=False)

    @property
    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    # The trainer is built with use_distributed_sampler=False: the loaders shard themselves over the processes.
    def train_dataloader(self):
        world, rank = self._world
        if self.hparams.repeated_aug and world > 1:  # DeiT's repeated augmentation (distributed only)
            sampler = RepeatAugSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, num_repeats=3)
            return self._loader(self.train_set, True, EpochIndexSampler(sampler, rank=rank))
        # One permutation per (seed, epoch), dealt round-robin: global batch k holds the same images on any number of
        # processes, and a resumed run sees the same batches as a straight one.
        sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=self.hparams.seed, drop_last=True)
        return self._loader(self.train_set, True, EpochIndexSampler(sampler))

    def val_dataloader(self):
        world, rank = self._world
        sampler = None
        if world > 1:  # pads the last shard with repeats, as Lightning's own sampler would
            sampler = torch.utils.data.DistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_set, False, sampler)
