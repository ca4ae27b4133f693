"""What every datamodule shares: per-sample seeded augmentation, and loaders that shard themselves over processes."""
import atexit
import itertools
import multiprocessing
import random
import signal
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader

from vimexp import VimexpError


@contextmanager
def seeded(*key: int | tuple):
    """torch's CPU generator, random and numpy (all three feed timm's and torchvision's transforms) seeded from `key`
    alone, whatever else used them; the process's RNG states come back afterwards. Keys hold ints only: their hash is
    the same in every process (None's is not, before Python 3.12). The CPU generator alone: torch.manual_seed would
    also queue a CUDA seeding, with a formatted stack trace, for every sample (150 us a sample)."""
    cpu = torch.default_generator
    states = random.getstate(), np.random.get_state(), cpu.get_state()
    sample_seed = hash(key) % 2**32
    cpu.manual_seed(sample_seed)
    random.seed(sample_seed)
    np.random.seed(sample_seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        cpu.set_state(states[2])


class SeededDataset(torch.utils.data.Dataset):
    """A dataset whose `load(index)` gives a sample's raw parts and whose `transform(*parts)` augments them, seeded per
    sample: by (seed, epoch, index, salt) when an EpochIndexSampler hands it (index, epoch, salt) keys."""

    seed: int = 0
    transform = None

    def load(self, index):
        raise NotImplementedError

    def __getitem__(self, index):
        epoch, salt = 0, (-1, -1)
        if isinstance(index, tuple):  # (index, epoch, salt) from an EpochIndexSampler
            index, epoch, salt = index
        with seeded(self.seed, epoch, index, salt):
            return self.transform(*self.load(index))


class EpochIndexSampler(torch.utils.data.Sampler):
    """Wraps a sampler to yield (index, epoch, salt), so that the dataset can seed each sample's augmentation.

    The salt is (-1, -1), unless the sampler yields an image more than once per epoch (repeated augmentation) and
    says where each index sits in the global batch (`global_position`): then it is that (step, place), so that each
    copy is augmented differently, and alike on any number of processes. Only ints: their hash is the same in every
    process (None's is not, before Python 3.12). `skip` leaves out the first indices of `epoch` (a run resumed within
    it); a new epoch starts from its first.
    """

    def __init__(self, sampler, epoch: int = 0, skip: int = 0):
        self.sampler, self.epoch, self.skip = sampler, None, skip
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int):
        if epoch != self.epoch and self.epoch is not None:
            self.skip = 0
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch, keys = self.epoch, enumerate(self.sampler)
        place = getattr(self.sampler, "global_position", None)
        for pos, i in itertools.islice(keys, self.skip, None):
            yield (i, epoch, (-1, -1) if place is None else place(pos))

    def __len__(self):
        return len(self.sampler)


class GroupedRepeatSampler(torch.utils.data.Sampler):
    """DeiT's repeated augmentation with mixup groups in the GPUs' place. DeiT's sampler (timm's RepeatAugSampler)
    repeats every image 3 times and deals the copies to 3 different GPUs, each of which mixes its own batch; here the
    global batch is `num_groups` groups of `group` images, group v gets what GPU v would, and this process loads the
    global positions offset .. offset + batch of each step. So the copies of an image fall in different mixup groups
    on any number of processes; with one group per process it is DeiT's sampler itself."""

    def __init__(self, dataset, num_groups: int, group: int, offset: int, batch: int):
        self.group, self.offset, self.batch = group, offset, batch
        self.parts = {v: RepeatAugSampler(dataset, num_replicas=num_groups, rank=v, shuffle=True, num_repeats=3)
                      for v in range(offset // group, (offset + batch - 1) // group + 1)}
        self.steps = len(self.parts[offset // group]) // group  # whole steps only (the loader drops the rest)

    def set_epoch(self, epoch: int):
        for part in self.parts.values():
            part.set_epoch(epoch)

    def global_position(self, pos: int) -> tuple[int, int]:
        """(step, place in the global batch) of this process's pos-th index: the same on any number of processes."""
        step, j = divmod(pos, self.batch)
        return step, self.offset + j

    def __iter__(self):
        parts = {v: list(part) for v, part in self.parts.items()}  # each group's images of this epoch, in order
        for step in range(self.steps):
            for pos in range(self.offset, self.offset + self.batch):
                v, i = divmod(pos, self.group)
                yield parts[v][step * self.group + i]

    def __len__(self):
        return self.steps * self.batch


def _leave_stop_signals_to_the_main_process(worker_id: int):
    """SLURM sends SIGTERM to every process of a job, a terminal Ctrl-C to every process in the foreground: the loader
    workers ignore them (and SIGUSR1), so that the main process can finish its step and write a checkpoint before it
    shuts them down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register  # runs before multiprocessing's exit handler (registered earlier), which SIGTERMs them and waits
def _end_loader_workers():
    """Loader workers still alive at exit (a run that failed) ignore SIGTERM: end them with SIGKILL."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


class ShardedDataModule(L.LightningDataModule):
    """Train/val loaders over `self.train_set` / `self.val_set` (set in `setup`), which take (index, epoch, salt) keys
    for seeded augmentation. `hparams.batch_size` is global: each of the trainer's processes loads batch_size /
    world_size. The trainer is built with use_distributed_sampler=False: the loaders shard themselves."""

    val_batch_size: int | None = None  # None: the per-device training batch
    collate_fn = None  # None: torch's default

    @property
    def per_device_batch(self) -> int:
        world = self.trainer.world_size if self.trainer else 1
        if self.hparams.batch_size % world:
            raise VimexpError(f"data.batch_size={self.hparams.batch_size} (global) does not split over {world} "
                              "processes: make it a multiple of the number of devices x nodes")
        return self.hparams.batch_size // world

    def _loader(self, dataset, train, sampler=None):
        h = self.hparams
        batch = self.per_device_batch if train or self.val_batch_size is None else self.val_batch_size
        return DataLoader(dataset, batch_size=batch, shuffle=train and sampler is None, sampler=sampler,
                          num_workers=h.num_workers, pin_memory=h.pin_memory and torch.cuda.is_available(),
                          drop_last=train, persistent_workers=False, collate_fn=self.collate_fn,
                          worker_init_fn=_leave_stop_signals_to_the_main_process)

    @property
    def _world(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def _resume_position(self, batches_per_epoch: int) -> tuple[int, int]:
        """(epoch, batches of it already trained) where fit starts: (0, 0), or where a resumed run's checkpoint was
        written, mid-epoch included (Lightning restores its loop counters before it asks for the loaders)."""
        if self.trainer is None:
            return 0, 0
        done = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        limit = self.trainer.limit_train_batches
        n = min(batches_per_epoch, limit) if isinstance(limit, int) else int(batches_per_epoch * limit)
        return divmod(done, n) if n else (0, 0)

    def _repeat_groups(self) -> int:
        """Mixup groups in the global batch when repeated augmentation is on, else 0. DeiT repeats images only on more
        than one GPU: here in more than one group (data.mixup_group, the official per-GPU batch); a batch smaller
        than a group is part of one."""
        h, group = self.hparams, self.mixup_group
        if not h.get("repeated_aug"):
            return 0
        if h.batch_size > group and h.batch_size % group:
            raise VimexpError(f"repeated augmentation deals images to groups of data.mixup_group={group}, "
                              f"but data.batch_size={h.batch_size} is no multiple of it: change one of them")
        return h.batch_size // group

    @property
    def mixup_group(self) -> int:
        return self.hparams.get("mixup_group") or self.per_device_batch

    def train_dataloader(self):
        world, rank = self._world
        groups = self._repeat_groups()
        if groups > 1:  # DeiT's repeated augmentation, the copies of an image in different mixup groups
            b = self.per_device_batch
            sampler = GroupedRepeatSampler(self.train_set, groups, self.mixup_group, rank * b, b)
        else:
            # One permutation per (seed, epoch), dealt round-robin: global batch k holds the same images on any number
            # of processes, and a resumed run sees the same batches as a straight one.
            sampler = torch.utils.data.DistributedSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True,
                                                          seed=self.hparams.seed, drop_last=True)
        epoch, done = self._resume_position(len(sampler) // self.per_device_batch)
        keys = EpochIndexSampler(sampler, epoch=epoch, skip=done * self.per_device_batch)
        return self._loader(self.train_set, True, keys)

    def val_dataloader(self):
        world, rank = self._world
        sampler = None
        if world > 1:  # pads the last shard with repeats, as Lightning's own sampler would
            sampler = torch.utils.data.DistributedSampler(self.val_set, num_replicas=world, rank=rank, shuffle=False)
        return self._loader(self.val_set, False, sampler)
