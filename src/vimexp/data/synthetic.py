"""Built-in synthetic shapes dataset, so the default run needs no download.

One scene model feeds every task: a `Scene` holds the image plus, per object, its class, a
boolean mask and a bbox, which is all that classification (ImageFolder), semantic segmentation
(ADE20K layout, via `Scene.semantic_map`) and detection/instance segmentation (COCO) need.
The class is carried by the shape only: colour (always bright on a dim background), position, size, rotation,
mirroring and the textured background are sampled independently of it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vimexp import VimexpError

# Sorted alphabetically so torchvision's ImageFolder (which sorts directory names) assigns
# index k to CLASSES[k]; the directory names are exactly these strings.
CLASSES: tuple[str, ...] = (
    "circle", "crescent", "cross", "halfdisc", "lshape",
    "ring", "square", "star", "stripes", "triangle",
)
assert list(CLASSES) == sorted(CLASSES)

# Bump when the scene model changes, so cached datasets from older code are regenerated.
GENERATOR_VERSION = 2
META_FILE = "vimexp_dataset.json"
_SPLITS = {"train": 0, "val": 1}  # split id feeds the rng: train and val never share a stream
_SS = 4  # supersampling factor: anti-aliased edges, and a mask that is the >=50% coverage set


def _ngon(n: int, r: float = 1.0, phase: float = 0.0, cx: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(a), r * np.sin(a)], 1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    a = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_half = np.pi * np.arange(25) / 24
# Each shape: polygons drawn in order, fill True adds and False cuts out (holes).
# Every vertex lies within the unit disc, so a shape of radius r centred >= r from the
# border stays fully inside the image under any rotation.
_SHAPES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_ngon(48), True)],
    "crescent": [(_ngon(48), True), (_ngon(48, 0.85, cx=0.45), False)],
    "cross": [(_rect(-0.95, -0.28, 0.95, 0.28), True), (_rect(-0.28, -0.95, 0.28, 0.95), True)],
    "halfdisc": [(np.stack([np.cos(_half), np.sin(_half)], 1), True)],
    "lshape": [(np.array([(-0.6, -0.8), (-0.1, -0.8), (-0.1, 0.3), (0.6, 0.3), (0.6, 0.8), (-0.6, 0.8)]), True)],
    "ring": [(_ngon(48), True), (_ngon(48, 0.55), False)],
    "square": [(_ngon(4, phase=np.pi / 4), True)],
    "star": [(_star(), True)],
    "stripes": [(_rect(-0.75, -0.65, 0.75, -0.2), True), (_rect(-0.75, 0.2, 0.75, 0.65), True)],
    "triangle": [(_ngon(3, phase=-np.pi / 2), True)],
}
assert tuple(_SHAPES) == CLASSES


@dataclass
class SceneObject:
    label: int  # index into CLASSES
    mask: np.ndarray  # (H, W) bool, visible pixels
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixel-edge coords: mask lies in [x0, x1) x [y0, y1)


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]  # objects[0] is the main object and gives the classification label

    @property
    def label(self) -> int:
        return self.objects[0].label

    def semantic_map(self) -> np.ndarray:
        """(H, W) int64: 0 = background, k + 1 = CLASSES[k]; later objects overwrite earlier ones."""
        out = np.zeros(self.image.shape[:2], np.int64)
        for obj in self.objects:
            out[obj.mask] = obj.label + 1
        return out


def _coverage(label: int, size: int, centre: np.ndarray, radius: float, angle: float, flip: bool) -> np.ndarray:
    """Fractional pixel coverage (H, W) float32 of a shape, rendered at _SS x and box-filtered."""
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    hi = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(hi)
    for poly, fill in _SHAPES[CLASSES[label]]:
        pts = (poly * [(-1.0 if flip else 1.0), 1.0]) @ rot.T * radius + centre
        draw.polygon([tuple(p) for p in (pts * _SS - 0.5)], fill=255 if fill else 0)
    a = np.asarray(hi, np.float32).reshape(size, _SS, size, _SS).mean((1, 3))
    return a / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field plus a faint low-frequency grating: textured, never shape-like, and dim
    (every channel below ~130), so that objects stand out by brightness and a patch embedding sees them linearly."""
    base = rng.uniform(0, 100, 3)
    coarse = np.clip(base + rng.normal(0, 15, (4, 4, 3)), 0, 120).astype(np.uint8)
    bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    theta, freq = rng.uniform(0, np.pi), rng.uniform(1, 4)  # period >= size/4: no thin stripes
    grating = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
    return bg + rng.uniform(0, 10) * grating[..., None]


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random bright colour, independent of class. (With random-polarity colours a 4-layer Vim or DeiT barely
    learns the task in minutes; a CNN does, a patch model has to learn colour invariance first.)"""
    return rng.uniform(150, 255, 3)


def make_scene(rng: np.random.Generator, size: int = 32, label: int | None = None, max_distractors: int = 0,
               scale: tuple[float, float] = (0.5, 0.9)) -> Scene:
    """One main object of class `label` (random if None) plus up to `max_distractors` smaller,
    non-overlapping objects of random classes, on a textured background with pixel noise. `scale` bounds the main
    object's diameter as a fraction of the image side."""
    if label is None:
        label = int(rng.integers(len(CLASSES)))
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    if size < 16:  # below this the smallest shapes lose their defining details (holes, gaps)
        raise ValueError(f"size must be >= 16, got {size}")
    img = _background(rng, size)
    objects: list[SceneObject] = []
    occupied = np.zeros((size, size), bool)
    n_extra = int(rng.integers(max_distractors + 1)) if max_distractors > 0 else 0
    for k in range(1 + n_extra):
        main = k == 0
        lab = label if main else int(rng.integers(len(CLASSES)))
        # Scale = diameter of the shape's bounding circle as a fraction of the image side.
        radius = rng.uniform(*scale) * size / 2 if main else rng.uniform(0.15, 0.3) * size / 2
        for _ in range(1 if main else 10):  # distractors: retry placement to avoid overlaps
            centre = rng.uniform(radius, size - radius, 2)
            alpha = _coverage(lab, size, centre, radius, rng.uniform(0, 2 * np.pi), bool(rng.integers(2)))
            mask = alpha >= 0.5
            if main or (mask.any() and not (mask & occupied).any()):
                break
        else:
            continue  # no free spot for this distractor: skip it
        col = _colour(rng)
        img = img * (1 - alpha[..., None]) + col * alpha[..., None]
        # Keep masks exclusive so instance masks are the visible pixels (matters only if placement changes).
        for o in objects:
            o.mask &= ~mask
        occupied |= mask
        ys, xs = np.nonzero(mask)
        objects.append(SceneObject(lab, mask, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))))
    img = img + rng.normal(0, rng.uniform(0, 10), img.shape)  # sensor-like noise over everything
    return Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), objects)


def _meta(*, train_per_class: int = 500, val_per_class: int = 100, size: int = 32, seed: int = 0) -> dict:
    return {"format": "vimexp-imagefolder", "version": GENERATOR_VERSION, "classes": list(CLASSES),
            "train_per_class": train_per_class, "val_per_class": val_per_class, "size": size, "seed": seed}


@contextlib.contextmanager
def _lock(root: Path):
    """Exclusive lock beside `root`, so concurrent processes (e.g. DDP ranks) generate once."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): single-process use only
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomically(root: Path, meta: dict, fill, images: int) -> Path:
    """Write a dataset of `images` images into a temporary sibling with `fill(tmp, done)`, `done()` after each image
    (a bar with the ETA on stderr: the larger datasets take minutes), then the metadata file (its presence marks a
    complete dataset), then rename it into place. Call with the lock held."""
    if root.exists() and not (root / META_FILE).is_file() and any(p.is_file() for p in root.rglob("*")):
        raise VimexpError(f"data.root {root} holds files the built-in generator did not write: it replaces only its own "
                          "datasets. For your data choose its config (data=imagenet, data=ade20k or data=coco) or set "
                          "data.generate=false")
    # Leftovers of interrupted runs are safe to delete: we hold the lock, so nobody is writing them.
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"  # unique per process; we hold the lock
    tmp.mkdir()
    try:
        with tqdm(total=images, desc="vimexp: writing images", unit="img") as bar:
            fill(tmp, bar.update)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write(root: Path, meta: dict) -> Path:
    def fill(tmp: Path, done):
        for split, split_id in _SPLITS.items():
            n = meta[f"{split}_per_class"]
            for label, name in enumerate(CLASSES):
                d = tmp / split / name
                d.mkdir(parents=True)
                for i in range(n):
                    # Per-image rng: output is independent of generation order and of other counts.
                    rng = np.random.default_rng([meta["seed"], split_id, label, i])
                    scene = make_scene(rng, meta["size"], label=label)
                    Image.fromarray(scene.image).save(d / f"{i:05d}.jpg", quality=95)
                    done()

    return _write_atomically(root, meta, fill, len(CLASSES) * (meta["train_per_class"] + meta["val_per_class"]))


def write_imagefolder(root, *, train_per_class: int = 500, val_per_class: int = 100, size: int = 32, seed: int = 0) -> Path:
    """(Re)write root/{train,val}/<class>/<i:05d>.jpg atomically; same seed -> byte-identical files."""
    root = Path(root)
    meta = _meta(train_per_class=train_per_class, val_per_class=val_per_class, size=size, seed=seed)
    with _lock(root):
        return _write(root, meta)


def _is_complete(root: Path, meta: dict) -> bool:
    try:
        if json.loads((root / META_FILE).read_text()) != meta:
            return False
        return all(len(os.listdir(root / split / name)) == meta[f"{split}_per_class"]
                   for split in _SPLITS for name in CLASSES)
    except (OSError, ValueError):
        return False


def ensure_imagefolder(root, **params) -> Path:
    """Return `root` if it holds a complete dataset with these parameters, else generate it (once)."""
    root = Path(root)
    meta = _meta(**params)  # unknown parameter names raise TypeError here
    if _is_complete(root, meta):  # fast path without touching the lock
        return root
    with _lock(root):
        if _is_complete(root, meta):  # another process finished it while we waited
            return root
        n = meta["train_per_class"] + meta["val_per_class"]
        print(f"vimexp: generating built-in dataset at {root} ({len(CLASSES)} classes x {n} images, "
              f"{meta['size']}px; once) ...", flush=True)
        _write(root, meta)
    return root


# ----- semantic segmentation: the ADE20K layout
ADE_SPLITS = {"training": 0, "validation": 1}


def _ade_meta(*, train: int = 2000, val: int = 200, size: int = 64, seed: int = 0) -> dict:
    return {"format": "vimexp-ade20k", "version": GENERATOR_VERSION, "classes": list(CLASSES), "training": train,
            "validation": val, "size": size, "seed": seed}


def _write_ade20k(root: Path, meta: dict) -> Path:
    """Scenes of 1-4 objects whose annotation PNGs hold 0 (background: ADE20K's "other", ignored in training) or
    k + 1 for CLASSES[k], under ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_<split>_<i>."""
    def fill(tmp: Path, done):
        for split, split_id in ADE_SPLITS.items():
            images, annotations = (tmp / "ADEChallengeData2016" / kind / split for kind in ("images", "annotations"))
            images.mkdir(parents=True)
            annotations.mkdir(parents=True)
            for i in range(meta[split]):
                rng = np.random.default_rng([meta["seed"], 10 + split_id, i])
                scene = make_scene(rng, meta["size"], max_distractors=3, scale=(0.3, 0.6))
                name = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
                Image.fromarray(scene.image).save(images / f"{name}.jpg", quality=95)
                Image.fromarray(scene.semantic_map().astype(np.uint8)).save(annotations / f"{name}.png")
                done()

    return _write_atomically(root, meta, fill, sum(meta[split] for split in ADE_SPLITS))


def _ensure_once(root: Path, meta: dict, write, what: str) -> Path:
    """Return `root` if its metadata file says it holds this dataset, else write it (`write(root, meta)`) once."""
    def complete() -> bool:
        try:
            return json.loads((root / META_FILE).read_text()) == meta
        except (OSError, ValueError):
            return False

    if not complete():
        with _lock(root):
            if not complete():
                print(f"vimexp: generating {what} at {root} (once) ...", flush=True)
                write(root, meta)
    return root


def ensure_ade20k(root, **params) -> Path:
    """Return `root` if it holds a complete built-in ADE20K-layout dataset with these parameters, else write it once.
    The dataset itself is root/ADEChallengeData2016."""
    meta = _ade_meta(**params)
    return _ensure_once(Path(root), meta, _write_ade20k, f"the built-in segmentation dataset ({meta['training']} + "
                        f"{meta['validation']} scenes, {meta['size']} px, ADE20K layout)")


# ----- detection and instance segmentation: the COCO layout
COCO_SPLITS = {"train2017": 0, "val2017": 1}


def _coco_meta(*, train: int = 2000, val: int = 200, size: int = 64, seed: int = 0) -> dict:
    return {"format": "vimexp-coco", "version": GENERATOR_VERSION, "classes": list(CLASSES), "train2017": train,
            "val2017": val, "size": size, "seed": seed}


def coco_annotations(scenes, names: list[str], start_id: int = 1) -> dict:
    """A COCO instances dict of `scenes` (saved as `names`): categories 1..10 = CLASSES, one annotation per visible
    object with its box [x, y, w, h], area and mask as compressed RLE."""
    from pycocotools import mask as mask_utils

    images, annotations = [], []
    for image_id, (scene, name) in enumerate(zip(scenes, names), start=1):
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for obj in scene.objects:
            if not obj.mask.any():  # hidden by a later object
                continue
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            x, y, bw, bh = mask_utils.toBbox(rle).tolist()
            annotations.append({"id": start_id + len(annotations), "image_id": image_id, "category_id": obj.label + 1,
                                "bbox": [x, y, bw, bh], "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_coco(root: Path, meta: dict) -> Path:
    """Scenes of 1-4 objects under {train2017,val2017}/<i:012d>.jpg with annotations/instances_<split>.json."""
    def fill(tmp: Path, done):
        (tmp / "annotations").mkdir()
        for split, split_id in COCO_SPLITS.items():
            (tmp / split).mkdir()
            scenes, names = [], []
            for i in range(meta[split]):
                rng = np.random.default_rng([meta["seed"], 20 + split_id, i])
                scenes.append(make_scene(rng, meta["size"], max_distractors=3, scale=(0.3, 0.6)))
                names.append(f"{i + 1:012d}.jpg")
                Image.fromarray(scenes[-1].image).save(tmp / split / names[-1], quality=95)
                done()
            ann = coco_annotations(scenes, names)
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))

    return _write_atomically(root, meta, fill, sum(meta[split] for split in COCO_SPLITS))


def ensure_coco(root, **params) -> Path:
    """Return `root` if it holds a complete built-in COCO-layout dataset with these parameters, else write it once."""
    meta = _coco_meta(**params)
    return _ensure_once(Path(root), meta, _write_coco, f"the built-in detection dataset ({meta['train2017']} + "
                        f"{meta['val2017']} scenes, {meta['size']} px, COCO layout)")


# ----- photo-sized JPEGs: what a loader benchmark decodes (ImageNet's typical 500x375, ~90 KB)
def _photo_meta(*, classes: int = 10, train_per_class: int = 500, val_per_class: int = 50, width: int = 500,
                height: int = 375, seed: int = 0) -> dict:
    return {"format": "vimexp-photo-jpegs", "version": GENERATOR_VERSION, "classes": classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class, "width": width, "height": height,
            "seed": seed}


def _photo(job) -> None:
    """One JPEG: a smooth colour field with photo-like grain (the grain gives it a photo's size), written to `path`."""
    path, key, width, height = job
    rng = np.random.default_rng(key)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(field, np.float32) + rng.normal(0, 18, (height, width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def _write_photos(root: Path, meta: dict) -> Path:
    def fill(tmp: Path, done):
        jobs = []
        for split, split_id in _SPLITS.items():
            for label in range(meta["classes"]):
                d = tmp / split / f"class{label:04d}"
                d.mkdir(parents=True)
                jobs += [(d / f"{i:06d}.JPEG", [meta["seed"], 20 + split_id, label, i], meta["width"], meta["height"])
                         for i in range(meta[f"{split}_per_class"])]
        with multiprocessing.get_context("spawn").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
            for _ in pool.imap_unordered(_photo, jobs, chunksize=16):
                done()

    total = meta["classes"] * (meta["train_per_class"] + meta["val_per_class"])
    return _write_atomically(root, meta, fill, total)


def ensure_photo_folder(root, **params) -> Path:
    """Return `root` if it holds these photo-sized JPEGs (ImageFolder layout: root/{train,val}/classNNNN/*.JPEG),
    else write them once, on every core. They carry no class signal: they are for timing a loader, not training."""
    meta = _photo_meta(**params)
    return _ensure_once(Path(root), meta, _write_photos, f"{meta['classes']} classes of {meta['width']}x"
                        f"{meta['height']} JPEGs")
