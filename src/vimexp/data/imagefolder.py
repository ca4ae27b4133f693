"""ImageFolder datamodule (ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg) with timm's transforms."""
from pathlib import Path

from PIL import Image
from timm.data import create_transform
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

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
                 mixup_group=128, pin_memory=True, val_split="val", seed=0):
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
