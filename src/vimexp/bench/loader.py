"""The training data loader alone, built as the CLI builds it: images/s with each number of workers, and per worker.

    python -m vimexp.bench bench=loader [bench.workers=[4,8,14]] [bench.train_overrides=[data=imagenet,data.root=DIR]]

Its img/s beside a model step's (bench=train) says whether a run can be loader-bound: on the H200 host, DeiT's
ImageNet pipeline decoded 187 photo-sized JPEGs a second a worker (docs/optimisation.md, step 31). By default it times
that pipeline on JPEGs it generates once (`bench.root`, `bench.generate`), and a worker's time an image stage by
stage (the decode, then each transform) in one process. On a GPU it also times the device's half of
a batch (the transfer hooks: RandAugment's records applied where data.rand_augment_on=device, normalising, erasing).
Writes results.json to out_dir.
"""
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from torchvision.transforms import Compose
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.bench import command, compose_train, say
from vimexp.data.sampling import seeded
from vimexp.data.synthetic import ensure_photo_folder
from vimexp.record import environment, write_json


def images_per_second(loader, rounds: int) -> float:
    """Images a second over `rounds` rounds of one batch a worker, after the first round. The workers start together
    and their first batches arrive together: counting them (as this bench once did) overstates the rate."""
    per_round = max(loader.num_workers, 1)
    if len(loader) < (rounds + 1) * per_round:
        raise VimexpError(f"bench.rounds={rounds} with {loader.num_workers} workers needs {(rounds + 1) * per_round} "
                          f"batches, more than the loader's {len(loader)}: lower it, or give the data more images "
                          "(bench.generate.train_per_class)")
    it = iter(loader)
    for _ in range(per_round):
        next(it)
    images, start = 0, time.perf_counter()
    for _ in range(rounds * per_round):
        images += len(next(it)[-1])  # the targets: a training batch's images come with their erasing boxes
    return images / (time.perf_counter() - start)


def stage_ms_per_image(dataset, images: int) -> dict[str, float]:
    """A worker's time an image, stage by stage, in this process: the decode, then each step of the train transform
    (RandAugment's recording as one step where data.rand_augment_on=device), over `images` seeded samples."""
    tf = dataset.transform  # a Compose, or device_augment.RecordedRandAugment's three parts
    if isinstance(tf, Compose):
        steps = list(tf.transforms)
    elif tf.crop is None:
        steps = [*tf.before.transforms, tf.rand_augment, *tf.after.transforms]
    else:  # data.resize_on=device: the crop drawn and cut, then the draws that need only the image's size
        steps = [tf.crop, tf.rand_augment_draws, tf.erase_draws]
    name = lambda step: getattr(step, "__name__", type(step).__name__)  # noqa: E731
    totals = dict.fromkeys(["decode", *map(name, steps)], 0.0)
    for i in range(images):
        with seeded(0, 0, i, 0):
            start = time.perf_counter()
            x = dataset.loader(dataset.samples[i % len(dataset)][0])
            totals["decode"] += time.perf_counter() - start
            for step in steps:
                start = time.perf_counter()
                x = step(x)
                totals[name(step)] += time.perf_counter() - start
    return {name: round(1e3 * t / images, 3) for name, t in totals.items()}


def device_ms_per_batch(data, batch, repeats: int = 20) -> tuple[float, float, float]:
    """One batch's transfer hooks, in milliseconds: the host's time to enqueue them, the device's from the first to
    the last (CUDA events; no less than the host's where launching bounds it), and the device's kernels and copies
    alone (torch.profiler): what they add to a training step queued before them."""
    def once():
        moved = data.transfer_batch_to_device(data.on_before_batch_transfer(batch, 0), torch.device("cuda"), 0)
        data.on_after_batch_transfer(moved, 0)
    once()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    host = time.perf_counter()
    start.record()
    for _ in range(repeats):
        once()
    end.record()
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            once()
        torch.cuda.synchronize()
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages())
    return 1e3 * host / repeats, start.elapsed_time(end) / repeats, kernels_us / 1e3 / repeats


def run(cfg) -> dict:
    b = cfg.bench
    overrides = list(b.train_overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        root = ensure_photo_folder(b.root, **b.generate)
        overrides += [f"data.root={root}", f"data.num_classes={b.generate.classes}"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the host's; the GPU's for the hooks
    record = {"environment": {**environment(device), "cpus": os.cpu_count()}, "command": command(),
              "batch": b.batch, "rounds": b.rounds, "train_overrides": overrides, "rows": []}
    for workers in tqdm(b.workers, desc="bench", unit="config"):
        data = instantiate(compose_train([*overrides, f"data.batch_size={b.batch}", f"data.num_workers={workers}",
                                           "paths.output_dir=."]).data)
        data.setup("fit")
        loader = data.train_dataloader()
        rate = images_per_second(loader, b.rounds)
        row = {"workers": workers, "img_per_sec": round(rate, 1),
               "img_per_sec_per_worker": round(rate / workers, 1) if workers else None}
        if "stage_ms_per_image" not in record:  # the same for every worker count
            record["stage_ms_per_image"] = stage_ms_per_image(data.train_set, b.stage_images)
        if torch.cuda.is_available():
            host, events, kernels = device_ms_per_batch(data, next(iter(loader)))
            row.update(hooks_host_ms_per_batch=round(host, 3), hooks_device_ms_per_batch=round(events, 3),
                       hooks_kernels_ms_per_batch=round(kernels, 3))
        record["rows"].append(row)
        say(f"{workers:3d} workers: {rate:8.1f} img/s" + (f", {rate / workers:6.1f} a worker" if workers else ""))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", record)
    print(f"results in {(out / 'results.json').resolve()}")
    return record
