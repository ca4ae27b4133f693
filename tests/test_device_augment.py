"""RandAugment on the device (data.rand_augment_on=device) against Pillow itself: each op on its own, pixel for pixel,
and timm's whole train pipeline, image for image."""
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa

from vimexp.data import compat, device_augment as da

BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels need a GPU, or Triton's interpreter without
FILL = (124, 116, 104)


def picture(seed, size=(47, 38), lo=0, hi=256):
    """Texture, edges and a gradient, so that every filter tap and rounding is exercised."""
    g = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 / w)[..., None] * np.array([1.0, 0.5, 0.2]) + (yy * 255 / h)[..., None] * np.array([0, 0.5, 0.8])
    noise = g.integers(-60, 60, (h, w, 3))
    img = np.clip(base + noise, lo, hi - 1).astype(np.uint8)
    img[h // 3:h // 2, w // 4:w // 2] = g.integers(lo, hi, 3)  # a flat block with hard edges
    return Image.fromarray(img)


def on_device(img, fn, *args, device=DEVICE, **kwargs):
    """Record timm's call of `fn`, then apply the record to the image as a batch of one on `device`."""
    record = da._RECORDERS[fn](img, *args, **kwargs)
    records = torch.zeros(1, 1, da.RECORD, dtype=torch.float64)
    records[0, 0, :len(record)] = torch.tensor(record, dtype=torch.float64)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    out = da.apply_records(x.to(device), records.to(device))
    return out[0].permute(1, 2, 0).cpu().numpy()


def assert_same(img, fn, *args, device=DEVICE, **kwargs):
    expected = np.asarray(fn(img, *args, **dict(kwargs)))
    got = on_device(img, fn, *args, device=device, **kwargs)
    diff = np.abs(expected.astype(int) - got.astype(int))
    assert diff.max() == 0, f"{fn.__name__}{args}: {np.count_nonzero(diff)} pixels differ, max {diff.max()}"


def test_auto_contrast_equals_pillow_over_ranges():
    rng = random.Random(2)
    for seed in range(40):
        lo = rng.randrange(0, 120)
        assert_same(picture(seed, lo=lo, hi=rng.randrange(lo + 2, 257)), timm_aa.auto_contrast)


@pytest.mark.parametrize("seed", range(4))
def test_lookup_ops_equal_pillow(seed):
    img = picture(seed)
    assert_same(img, timm_aa.invert)
    assert_same(img, timm_aa.equalize)
    assert_same(img, timm_aa.auto_contrast)
    assert_same(picture(seed, lo=40, hi=201), timm_aa.auto_contrast)  # a stretched range
    assert_same(picture(seed, lo=17, hi=160), timm_aa.equalize)
    for bits in range(0, 9):
        assert_same(img, compat.posterize, bits)
    for thresh in (0, 1, 77, 128, 200, 255, 256):
        assert_same(img, timm_aa.solarize, thresh)
    for add in (0, 1, 50, 110):
        assert_same(img, timm_aa.solarize_add, add)


def test_flat_and_two_valued_images_equal_pillow():
    flat = Image.new("RGB", (20, 16), (90, 90, 200))
    two = Image.fromarray(np.where(np.arange(16 * 20).reshape(16, 20, 1) % 7 == 0, 250, 3).astype(np.uint8)
                          .repeat(3, 2))
    for img in (flat, two):
        for fn in (timm_aa.equalize, timm_aa.auto_contrast):
            assert_same(img, fn)


@pytest.mark.parametrize("fn", [timm_aa.color, timm_aa.contrast, timm_aa.brightness, timm_aa.sharpness])
def test_enhance_ops_equal_pillow(fn):
    rng = random.Random(0)
    factors = [0.0, 1.0, 0.1, 0.5, 1.9] + [rng.uniform(0.1, 1.9) for _ in range(8)]
    for seed, factor in enumerate(factors):
        assert_same(picture(seed), fn, factor)


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC])
def test_affine_ops_equal_pillow(resample):
    rng = random.Random(1)
    kw = dict(fillcolor=FILL, resample=resample)
    for seed in range(6):
        img = picture(seed)
        assert_same(img, timm_aa.shear_x, rng.uniform(-0.3, 0.3), **kw)
        assert_same(img, timm_aa.shear_y, rng.uniform(-0.3, 0.3), **kw)
        assert_same(img, timm_aa.translate_x_rel, rng.uniform(-0.45, 0.45), **kw)
        assert_same(img, timm_aa.translate_y_rel, rng.uniform(-0.45, 0.45), **kw)
        assert_same(img, timm_aa.translate_x_abs, rng.uniform(-20, 20), **kw)
        assert_same(img, timm_aa.rotate, rng.uniform(-30, 30), **kw)
    assert_same(picture(9), timm_aa.rotate, 0.0, **kw)
    assert_same(picture(9, size=(32, 32)), timm_aa.rotate, 90.0, **kw)


def test_imagenet_pipeline_gives_the_workers_images(tmp_path):
    """DeiT's train pipeline at 224 px on ImageNet-sized JPEGs: with RandAugment on the device, and with the random
    crop's resize there too, every image of the batch equals the one the workers make with timm's Pillow pipeline,
    for the same sample keys; and the records exercise every op."""
    from torch.utils.data import default_collate

    from vimexp.data.imagefolder import ImageFolderDataModule
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                picture(10 * c + i, size=(500, 375)).save(tmp_path / split / f"c{c}" / f"{i}.jpg", quality=90)
    batches, ops = {}, set()
    for augment, resize in (("workers", "workers"), ("device", "workers"), ("device", "device")):
        dm = ImageFolderDataModule(tmp_path, num_classes=2, batch_size=64, num_workers=0, rand_augment_on=augment,
                                   resize_on=resize)
        dm.setup()
        samples = [dm.train_set[(i, epoch, (0, 0))] for epoch in range(24) for i in range(8)]
        batch = dm.on_before_batch_transfer((dm.collate_fn or default_collate)(samples), 0)
        if augment == "device":
            ops = set(batch[3][:, :, 0].flatten().long().tolist())
        batch = dm.transfer_batch_to_device(batch, torch.device(DEVICE), 0)
        batches[augment, resize] = dm.on_after_batch_transfer(batch, 0)[0].cpu()
    assert ops == set(range(da.CODES)) - {da.AFFINE_BILINEAR}  # DeiT's bicubic: every op, and 'none', drawn
    assert torch.equal(batches["workers", "workers"], batches["device", "workers"])
    assert torch.equal(batches["workers", "workers"], batches["device", "device"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_op_equals_pillow_on_the_gpu():
    """CUDA rounds as the CPU does here: no fused multiply-adds in the kernel or across the ops' steps, no reciprocal
    divisions."""
    rng = random.Random(3)
    kw = dict(fillcolor=FILL, device="cuda")
    for seed in range(8):
        img = picture(seed, size=(224, 224))
        for fn in (timm_aa.invert, timm_aa.equalize, timm_aa.auto_contrast):
            assert_same(img, fn, device="cuda")
        assert_same(picture(seed, lo=rng.randrange(0, 90), hi=rng.randrange(160, 257)), timm_aa.auto_contrast,
                    device="cuda")
        assert_same(img, compat.posterize, rng.randrange(0, 9), device="cuda")
        assert_same(img, timm_aa.solarize, rng.randrange(0, 257), device="cuda")
        assert_same(img, timm_aa.solarize_add, rng.randrange(0, 111), device="cuda")
        for fn in (timm_aa.color, timm_aa.contrast, timm_aa.brightness, timm_aa.sharpness):
            assert_same(img, fn, rng.uniform(0.1, 1.9), device="cuda")
        for resample in (BILINEAR, BICUBIC):
            assert_same(img, timm_aa.shear_x, rng.uniform(-0.3, 0.3), resample=resample, **kw)
            assert_same(img, timm_aa.translate_y_rel, rng.uniform(-0.45, 0.45), resample=resample, **kw)
            assert_same(img, timm_aa.rotate, rng.uniform(-30, 30), resample=resample, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_is_augmented_without_waiting_for_the_gpu():
    """No op copies from the host or reads back: a sync would stall the training step queued before it."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 224, 224), dtype=torch.uint8, generator=g)
    records = torch.zeros(64, 2, da.RECORD, dtype=torch.float64)
    records[:, :, 0] = torch.randint(0, da.CODES, (64, 2), generator=g)
    records[:, :, 1] = 0.7  # a factor, a bit count, a threshold or the affine matrix's first entry
    records[:, :, 2:7] = torch.tensor([0.1, 3.0, 0.05, 1.0, -2.0], dtype=torch.float64)
    records[:, :, 7:10] = 100.0
    images, records = images.cuda(), records.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        da.apply_records(images, records)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_graphed_batch_equals_the_eager_one():
    """One graph a batch shape, replayed on new images and records, gives what apply_records gives eagerly."""
    g = torch.Generator().manual_seed(1)
    graphed = da.GraphedRecords()
    for _ in range(3):
        images = torch.randint(0, 256, (16, 3, 64, 80), dtype=torch.uint8, generator=g).cuda()
        records = torch.zeros(16, 2, da.RECORD, dtype=torch.float64)
        records[:, :, 0] = torch.randint(0, da.CODES, (16, 2), generator=g)
        records[:, :, 1] = torch.rand(16, 2, generator=g) * 1.5
        records[:, :, 2:7] = torch.tensor([0.1, 3.0, 0.05, 1.0, -2.0], dtype=torch.float64)
        records = records.cuda()
        assert torch.equal(graphed(images, records), da.apply_records(images, records))
    assert len(graphed.graphs) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_failed_capture_says_so_and_runs_eagerly(monkeypatch):
    def fail(images, records):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(da.GraphedRecords, "_capture", staticmethod(fail))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).cuda()
    records = torch.zeros(4, 2, da.RECORD, dtype=torch.float64, device="cuda")
    records[:, :, 0], records[:, :, 1] = da.INVERT, 0.5
    graphed = da.GraphedRecords()
    with pytest.warns(UserWarning, match="runs eagerly"):
        out = graphed(images, records)
    assert torch.equal(out, images) and graphed.eager  # inverted twice


@pytest.mark.parametrize("resample", [BICUBIC, BILINEAR])
def test_crops_of_every_size_resize_on_the_device_as_pillow_resizes_them(resample):
    """A batch of crops, the output's size, larger, smaller, much smaller and much taller (where Pillow 13 runs the
    vertical pass first), resized on the device with the worker's coefficients: Pillow's pixels, flipped where
    drawn."""
    assert_resized_as_pillow(resample, DEVICE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("resample", [BICUBIC, BILINEAR])
def test_crops_resize_on_the_gpu_as_pillow_resizes_them(resample):
    assert_resized_as_pillow(resample, "cuda")


def assert_resized_as_pillow(resample, device):
    size = (37, 41)  # height, width
    samples, expected = [], []
    for seed, (w, h) in enumerate([(41, 37), (500, 375), (20, 15), (97, 211), (300, 40), (41, 90), (45, 400)]):
        img, flip = picture(seed, size=(w, h)), seed % 2 == 1
        crop = ((np.asarray(img), *da.resize_passes(h, w, size, resample)), flip)
        samples.append(((crop, torch.zeros(1, 5), torch.zeros(2, da.RECORD)), seed))
        reference = img.resize(size[::-1], resample)
        expected.append(np.asarray(reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else reference))
    (crops, boxes, records), targets = da.collate_crops(samples)
    assert boxes.shape == (7, 1, 5) and records.shape == (7, 2, da.RECORD) and targets.tolist() == list(range(7))
    crops = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in crops.items()}
    out = da.resize_crops(crops, size).permute(0, 2, 3, 1).cpu().numpy()
    for (w, h), got, want in zip([(41, 37), (500, 375), (20, 15), (97, 211), (300, 40), (41, 90), (45, 400)], out,
                                 expected):
        assert np.array_equal(got, want), ((w, h), np.abs(got.astype(int) - want).max())


@pytest.mark.parametrize("overrides, says", [
    (dict(resize_on="nowhere"), "data.resize_on=nowhere is not a place: use workers or device"),
    (dict(resize_on="device"), "data.resize_on=device comes with RandAugment on the device: set data.rand_augment_on="),
    (dict(resize_on="device", rand_augment_on="device", auto_augment=None), "data.resize_on=device comes with"),
])
def test_resize_on_the_device_without_randaugment_there_is_refused_in_one_line(overrides, says, tmp_path):
    from vimexp import VimexpError
    from vimexp.data.imagefolder import ImageFolderDataModule
    with pytest.raises(VimexpError, match=re.escape(says)):
        ImageFolderDataModule(tmp_path, num_classes=2, **overrides)
