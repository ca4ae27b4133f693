"""Classification batches travel as uint8 and are normalised and randomly erased after the transfer
(vimexp/data/imagefolder.py): against timm's float pipeline, which does both in the worker, and against timm's
RandomErasing for where and how much it erases."""
import pytest
import torch
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import default_collate

from vimexp.data.imagefolder import CheckedImageFolder, EraseBoxes, ImageFolderDataModule, erase
from vimexp.data.sampling import seeded

MEAN, STD = (0.3, 0.6, 0.5), (0.2, 0.3, 0.25)  # not timm's defaults: RandAugment must fill with this mean


def _datamodule(tiny_data, **kwargs):
    dm = ImageFolderDataModule(tiny_data, num_classes=10, img_size=32, batch_size=16, num_workers=0, mean=MEAN,
                               std=STD, **kwargs)
    dm.setup()
    return dm


def _on_device(dm, samples):
    """What the task gets: the collated batch through the datamodule's transfer hooks, on the GPU where there is one
    (RandAugment on the device needs it, or Triton's interpreter), returned on the CPU."""
    batch = dm.on_before_batch_transfer(default_collate(samples), 0)
    if torch.cuda.is_available():
        batch = dm.transfer_batch_to_device(batch, torch.device("cuda"), 0)
    return [t.cpu() for t in dm.on_after_batch_transfer(batch, 0)]


@pytest.mark.parametrize("split, re_prob, re_count, rand_augment_on", [
    ("train", 0.0, 1, "workers"), ("train", 1.0, 1, "workers"), ("train", 1.0, 3, "workers"), ("val", 0.0, 1, "workers"),
    ("train", 0.0, 1, "device"), ("train", 1.0, 3, "device")])
def test_uint8_batches_end_as_timms_float_pipeline_makes_them(tiny_data, split, re_prob, re_count, rand_augment_on):
    """The same keys give what timm's float transforms give in the worker, to float rounding: the augmentations
    (RandAugment filling with this data's mean colour) and the erasing boxes draw the same numbers, only the
    normalising and erasing moved ('const' erasing, so that the fills compare too), and with
    rand_augment_on=device RandAugment too."""
    common = dict(auto_augment="rand-m9-mstd0.5-inc1", scale=(0.5, 1.0), re_prob=re_prob, re_mode="const",
                  re_count=re_count)
    dm = _datamodule(tiny_data, rand_augment_on=rand_augment_on, **common)
    float_tf = create_transform(32, is_training=split == "train", hflip=0.5, color_jitter=0.3, interpolation="bicubic",
                                crop_pct=0.875, mean=MEAN, std=STD, **common)
    reference = CheckedImageFolder(tiny_data / split, float_tf)
    dataset = dm.train_set if split == "train" else dm.val_set
    keys = [(i, 3, (-1, -1)) for i in range(0, 80, 5)] if split == "train" else list(range(16))
    samples = [dataset[k] for k in keys]
    images = samples[0][0][0] if split == "train" else samples[0][0]
    assert images.dtype == torch.uint8
    got, targets = _on_device(dm, samples)
    want = torch.stack([reference[k][0] for k in keys])
    assert got.dtype == torch.float32 and (got - want).abs().max() < 1e-5
    assert targets.tolist() == [reference[k][1] for k in keys]
    if re_prob:
        assert (got == 0).flatten(1).any(1).all()  # every image erased


def test_erasing_boxes_are_drawn_from_the_sample_and_filled_from_their_own_seed():
    image = torch.zeros(3, 64, 48, dtype=torch.uint8)
    draw = EraseBoxes(1.0, count=3)
    with seeded(0, 1, 2):
        _, boxes = draw(image)
    with seeded(0, 1, 2):
        again = draw(image)[1]
    with seeded(0, 1, 3):
        other = draw(image)[1]
    assert torch.equal(boxes, again) and not torch.equal(boxes, other)
    assert boxes.shape == (3, 5) and (boxes[:, 2] > 0).any()
    for top, left, h, w, _ in boxes.tolist():
        assert h == 0 or (top + h <= 64 and left + w <= 48)
    for mode in ("pixel", "rand", "const"):
        images = torch.full((2, 3, 64, 48), 7.0)
        erase(images, [boxes.tolist(), [[0] * 5] * 3], mode, torch.Generator())
        twice = torch.full((2, 3, 64, 48), 7.0)
        erase(twice, [boxes.tolist(), [[0] * 5] * 3], mode, torch.Generator())
        assert torch.equal(images, twice) and torch.equal(images[1], torch.full((3, 64, 48), 7.0))
        top, left, h, w, _ = next(r for r in boxes.tolist() if r[2])
        patch = images[0, :, top:top + h, left:left + w]
        if mode == "const":
            assert torch.equal(patch, torch.zeros_like(patch))
        elif mode == "rand":  # one colour a box
            assert torch.equal(patch, patch[:, :1, :1].expand_as(patch)) and not (patch == 7.0).any()
        else:
            assert patch.flatten().unique().numel() > h * w  # a value a pixel and channel
    assert (images[0] == 7.0).any()  # what no box covers is left alone


def test_erasing_draws_the_boxes_timms_random_erasing_draws():
    """Independent reference: timm's RandomErasing on ones, zeros where it erased ('const'), from the same seeded
    RNG: EraseBoxes draws the same box, or none, for each of 2,000 images, about a quarter of them erased."""
    timm_erase = RandomErasing(probability=0.25, mode="const", max_count=1, device="cpu")
    ours = EraseBoxes(0.25, count=1)
    theirs, mine = [], []
    for i in range(2000):
        with seeded(i):
            erased = timm_erase(torch.ones(3, 64, 48))[0] == 0
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        theirs.append((rows[0].item(), cols[0].item(), len(rows), len(cols)) if len(rows) else None)
        with seeded(i):
            top, left, h, w, _ = ours(torch.zeros(3, 64, 48, dtype=torch.uint8))[1][0].tolist()
        mine.append((top, left, h, w) if h else None)
    assert mine == theirs
    assert 0.22 < sum(b is not None for b in mine) / len(mine) < 0.28
