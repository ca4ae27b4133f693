"""Mixup / CutMix once per data.mixup_group images (the official per-GPU batch), and repeated augmentation that deals an
image's copies to different groups, so that 1, 2 or 4 devices (or 8 GPUs) draw the same statistics."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.data.distributed_sampler import RepeatAugSampler

from conftest import TINY_RUN, compose_cfg, data_overrides
from vimexp import VimexpError
from vimexp.data.imagefolder import ImageFolderDataModule
from vimexp.data.sampling import EpochIndexSampler, GroupedRepeatSampler, seeded
from vimexp.tasks.classification import group_mixup, mixup_chunks
from vimexp.train import train

CLASSES = 256


def deit_mixup(smoothing=0.0):
    return Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=smoothing, num_classes=CLASSES)


def batch(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % CLASSES


def lambdas(targets, labels) -> np.ndarray:
    """Each image's lambda: the weight of its own label (distinct labels, no smoothing)."""
    return targets[torch.arange(len(labels)), labels].numpy()


def devices(world, seed, group=128, n=256):
    """group_mixup as `world` devices would run it on one global batch of n: each its slice, its offset."""
    x, y = batch(n)
    b = n // world
    parts = [group_mixup(deit_mixup(), x[r * b:(r + 1) * b].clone(), y[r * b:(r + 1) * b], r * b, group, seed)
             for r in range(world)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), y


def test_chunks_follow_the_groups_of_the_global_batch():
    assert mixup_chunks(0, 256, 128) == [(0, 0, 128), (1, 128, 256)]
    assert mixup_chunks(64, 64, 128) == [(0, 0, 64)]  # rank 1 of 16 x 64: the second half of group 0
    assert mixup_chunks(96, 96, 64) == [(1, 0, 32), (2, 32, 96)]  # a device's batch across a group boundary
    assert mixup_chunks(128, 128, None) == [(1, 0, 128)]  # None: a device's batch is its group


def test_each_group_is_timms_mixup_with_its_own_draw():
    """256 images, groups of 128: two independent draws (lambda, switch, box), each applied to its half, exactly as
    timm's Mixup applied to that half alone with the group's RNG state."""
    x, y = batch()
    mixed, targets = group_mixup(deit_mixup(), x.clone(), y, 0, 128, seed=7)
    for gid, half in enumerate((slice(0, 128), slice(128, 256))):
        with seeded(7, gid):
            ref_x, ref_y = deit_mixup()(x[half].clone(), y[half])
        assert torch.equal(mixed[half], ref_x) and torch.equal(targets[half], ref_y)
    lam = lambdas(targets, y)
    assert len(set(lam[:128])) == 1 and len(set(lam[128:])) == 1 and lam[0] != lam[128]


def test_one_two_and_four_devices_draw_the_same_lambdas():
    """One device with 256 images, two with 128, four with 64 (each group of 128 split over two devices): the same
    lambda for every image, 2 distinct per 256."""
    for seed in range(5):
        ref = lambdas(*devices(1, seed)[1:])
        for world in (2, 4):
            _, targets, y = devices(world, seed)
            np.testing.assert_array_equal(lambdas(targets, y), ref)
        assert len(set(ref)) == 2


def test_lambda_statistics_match_one_draw_per_group():
    """Over many batches split over two devices: one lambda per group of 128, the two groups' draws independent."""
    pairs = []
    for seed in range(200):
        lam = lambdas(*devices(2, seed)[1:])
        assert len(set(lam[:128])) == len(set(lam[128:])) == 1
        pairs.append((lam[0], lam[128]))
    pairs = np.array(pairs)
    assert np.mean(pairs[:, 0] != pairs[:, 1]) > 0.9  # independent draws (cutmix's whole-pixel boxes can tie)
    assert 0.45 < pairs.mean() < 0.7 and abs(np.corrcoef(pairs.T)[0, 1]) < 0.2  # cutmix's clipped boxes raise it


def test_an_odd_piece_of_a_group_is_refused():
    x, y = batch(6)
    with pytest.raises(VimexpError, match="make data.mixup_group and the per-device batch even"):
        group_mixup(deit_mixup(), x, y, 0, 3, seed=0)


# ----- repeated augmentation over the groups
DATA = list(range(300))


def stream(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_one_device_deals_like_deits_sampler_on_one_gpu_per_group():
    """4 groups of 8 on one device: step s holds group v's images s*8 .. s*8+7 of RepeatAugSampler(rank v of 4)."""
    one = stream(GroupedRepeatSampler(DATA, num_groups=4, group=8, offset=0, batch=32), epoch=3)
    ranks = [stream(RepeatAugSampler(DATA, num_replicas=4, rank=v, num_repeats=3), epoch=3) for v in range(4)]
    steps = len(ranks[0]) // 8
    assert one == [i for s in range(steps) for v in range(4) for i in ranks[v][s * 8:(s + 1) * 8]]
    for s in range(steps):  # an image's copies are in different groups, as they were on different GPUs
        for v in range(4):
            group = one[s * 32 + v * 8:s * 32 + (v + 1) * 8]
            assert len(set(group)) == 8


@pytest.mark.parametrize("world", [2, 4, 8])
def test_devices_split_the_one_device_batches(world):
    """2, 4 or 8 devices (8: each group of 8 over two devices) load the slices of the one-device batches."""
    one = stream(GroupedRepeatSampler(DATA, 4, 8, 0, 32), epoch=1)
    b = 32 // world
    for r in range(world):
        mine = stream(GroupedRepeatSampler(DATA, 4, 8, r * b, b), epoch=1)
        assert mine == [i for s in range(len(one) // 32) for i in one[s * 32 + r * b:s * 32 + (r + 1) * b]]


def test_resume_skips_into_the_same_grouped_stream():
    """A run resumed after 2 batches of epoch 1 loads the rest of that epoch's stream, then epoch 2 from its start."""
    full = list(EpochIndexSampler(GroupedRepeatSampler(DATA, 4, 8, 0, 32), epoch=1))
    resumed = EpochIndexSampler(GroupedRepeatSampler(DATA, 4, 8, 0, 32), epoch=1, skip=64)
    assert list(resumed) == full[64:]
    assert len({salt for _, _, salt in full}) == len(full)  # every copy its own augmentation
    resumed.set_epoch(2)
    assert list(resumed) == list(EpochIndexSampler(GroupedRepeatSampler(DATA, 4, 8, 0, 32), epoch=2))


# ----- through the datamodule and a training run
def test_the_datamodule_repeats_over_groups_on_one_device(tiny_data):
    dm = ImageFolderDataModule(tiny_data, num_classes=10, img_size=32, batch_size=16, mixup_group=8, num_workers=0,
                               auto_augment=None, re_prob=0.0)
    dm.setup()
    sampler = dm.train_dataloader().sampler.sampler
    assert isinstance(sampler, GroupedRepeatSampler) and len(sampler) == 80  # 80 images: 2 groups x 40, 5 steps
    dm.hparams.mixup_group = 6
    with pytest.raises(VimexpError, match="data.batch_size=16 is no multiple of it"):
        dm.train_dataloader()
    dm.hparams.update(mixup_group=16)  # one group: no repeats, as DeiT on one GPU
    assert not isinstance(dm.train_dataloader().sampler.sampler, GroupedRepeatSampler)


def test_the_datamodule_seeds_each_copy_alike_on_one_and_on_two_devices(tiny_data):
    """The keys that seed each sample's augmentation (index, epoch, salt), global batch by global batch, are the
    same on 1 and 2 devices: a copy's salt is its place in the global batch, not in a device's stream."""
    def keys(world):
        dm = ImageFolderDataModule(tiny_data, num_classes=10, img_size=32, batch_size=16, mixup_group=8,
                                   num_workers=0, auto_augment=None, re_prob=0.0)
        dm.setup()
        progress = SimpleNamespace(total=SimpleNamespace(processed=0))
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
        streams = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, limit_train_batches=1.0, fit_loop=loop)
            streams.append(list(dm.train_dataloader().sampler))
        b = 16 // world
        return [[key for s in streams for key in s[t * b:(t + 1) * b]] for t in range(len(streams[0]) // b)]
    one = keys(1)
    assert keys(2) == one and len({key[2] for batch in one for key in batch}) == 80  # every copy its own salt


def test_a_run_mixes_per_group_with_repeated_augmentation(tiny_data, tmp_path):
    cfg = compose_cfg(["debug=fdr", *data_overrides(tiny_data), *TINY_RUN, "data.repeated_aug=true",
                       "data.mixup_group=8", "task.mixup=0.8", "task.cutmix=1.0"], tmp_path)
    assert cfg.task.mixup_group == 8
    assert train(cfg)["final"]
