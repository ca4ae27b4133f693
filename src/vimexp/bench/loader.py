"""The training data loader alone, built as the CLI builds it: images/s with each number of workers, and per worker.

    python -m vimexp.bench bench=loader [bench.workers=[4,8,14]] [bench.train_overrides=[data=imagenet,data.root=DIR]]

Its img/s beside a model step's (bench=train) says whether a run can be loader-bound: on the H200 host, DeiT's
ImageNet pipeline decoded 242 photo-sized JPEGs a second a worker (docs/optimisation.md, step 26). By default it times
that pipeline on JPEGs it generates once (`bench.root`, `bench.generate`). Writes results.json to out_dir.
"""
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.bench import command, compose_train, say
from vimexp.data.synthetic import ensure_photo_folder
from vimexp.record import environment, write_json


def images_per_second(loader, batches: int) -> float:
    """Images a second over `batches` batches after the first (which waits for the workers to start)."""
    if len(loader) <= batches:
        raise VimexpError(f"bench.batches={batches} needs more than the loader's {len(loader)} batches: lower it, or "
                          "give the data more images (bench.generate.train_per_class)")
    it = iter(loader)
    next(it)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        images += len(next(it)[0])
    return images / (time.perf_counter() - start)


def run(cfg) -> dict:
    b = cfg.bench
    overrides = list(b.train_overrides)
    if not any(o.startswith("data.root=") for o in overrides):
        root = ensure_photo_folder(b.root, **b.generate)
        overrides += [f"data.root={root}", f"data.num_classes={b.generate.classes}"]
    record = {"environment": {**environment(torch.device("cpu")), "cpus": os.cpu_count()}, "command": command(),
              "batch": b.batch, "batches": b.batches, "train_overrides": overrides, "rows": []}
    for workers in tqdm(b.workers, desc="bench", unit="config"):
        data = instantiate(compose_train([*overrides, f"data.batch_size={b.batch}", f"data.num_workers={workers}",
                                           "paths.output_dir=."]).data)
        data.setup("fit")
        rate = images_per_second(data.train_dataloader(), b.batches)
        row = {"workers": workers, "img_per_sec": round(rate, 1),
               "img_per_sec_per_worker": round(rate / workers, 1) if workers else None}
        record["rows"].append(row)
        say(f"{workers:3d} workers: {rate:8.1f} img/s" + (f", {rate / workers:6.1f} a worker" if workers else ""))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", record)
    print(f"results in {(out / 'results.json').resolve()}")
    return record
