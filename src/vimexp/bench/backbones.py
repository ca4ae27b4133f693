"""Throughput and peak memory of backbones: `python -m vimexp.bench bench=fig1|fig3_4|train|train_hier`
(conf/bench.yaml, conf/bench/<name>.yaml).

Protocol: a fresh model per configuration, `warmup` untimed batches, then `repeats` timings of `iters` batches each
(vimexp.bench.timing: CUDA events on a GPU, wall clock on the CPU); img/s is batch / the median time per batch. Peak
memory is torch.cuda.max_memory_allocated() over warm-up and timing (weights, activations, optimizer state in train
mode), reset per configuration. A configuration that runs out of memory is recorded as OOM and the sweep goes on.
Writes results.json (rows + environment), results.csv, and per (batch, precision) a PNG in the style of Figure 1.
"""
import csv
import gc
import itertools
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.bench import command, pick_device, say
from vimexp.bench.timing import seconds_per_call, spin_up
from vimexp.models import create_model
from vimexp.models.dense.necks import PyramidBackbone
from vimexp.ops import backend
from vimexp.record import environment, write_json

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


def build(spec: dict, res: int, neck: bool, kernel: str) -> torch.nn.Module:
    spec = dict(spec)
    name = spec.pop("name")
    if name.startswith(("vim", "hier_vim")):
        spec.setdefault("kernel", kernel)
    model = create_model(name, img_size=res, num_classes=1000, **spec)
    if neck:
        depth = len(getattr(model, "layers", None) or model.blocks)
        model = PyramidBackbone(model, out_indices=[depth // 4 * k - 1 for k in range(1, 5)])
    return model


def _step_fn(model, x, mode, dtype, cuda_graph=False):
    graphed = cuda_graph and x.device.type == "cuda"
    autocast = torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                              cache_enabled=not graphed)  # autocast's weight cache can't outlive a graph capture
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)
        return _cuda_graph(step) if graphed else step
    model.train()
    # fused, as the training CLI's; capturable: a graph keeps the optimizer's step count on the GPU
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)

    def step():
        opt.zero_grad(set_to_none=True)  # captured: the backward then writes fresh gradients on every replay
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out, target) if torch.is_tensor(out) else sum(o.float().mean() for o in out)
        loss.backward()
        opt.step()
    return _cuda_graph(step) if graphed else step


def _cuda_graph(step):
    """Capture one step (a forward, or a whole training step with its optimizer) as a CUDA graph and return its
    replay: one launch instead of hundreds, which is what bounds a small-batch Vim forward and a fused Vim-Ti
    training step at batch 128 (the host, not the GPU: docs/optimisation.md)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up kernels, allocator and optimizer state outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure(key, spec, res, batch, precision, cfg, device) -> dict:
    row = {"model": key, "spec": dict(spec), "res": res, "batch": batch, "precision": precision,
           "mode": cfg.bench.mode, "neck": bool(cfg.bench.neck), "cuda_graph": bool(cfg.get("cuda_graph")),
           "compile": bool(cfg.get("compile"))}
    model = None
    try:
        model = build(spec, res, cfg.bench.neck, cfg.kernel).to(device)
        if cfg.get("compile"):
            model.compile()
        row["params"] = sum(p.numel() for p in model.parameters())
        x = torch.randn(batch, 3, res, res, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = _step_fn(model, x, cfg.bench.mode, PRECISIONS[precision], cfg.get("cuda_graph", False))
        times = seconds_per_call(step, device, cfg.warmup, cfg.repeats, cfg.iters)
        ms = statistics.median(times) * 1e3
        row.update(status="ok", ms_per_batch=round(ms, 3), img_per_sec=round(batch / ms * 1e3, 2),
                   ms_spread=[round(min(times) * 1e3, 3), round(max(times) * 1e3, 3)])
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    except torch.OutOfMemoryError:
        row.update(status="OOM")
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def ratio_table(rows, baseline) -> str:
    """Markdown: per (batch, precision, res) the baseline's img/s and memory against every other model."""
    others = sorted({r["model"] for r in rows} - {baseline})
    head = "| batch | precision | res | " + " | ".join(f"{baseline} / {o} img/s | {baseline} memory vs {o}"
                                                        for o in others) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(others))]
    index = {(r["model"], r["batch"], r["precision"], r["res"]): r for r in rows}
    for b, p, res in sorted({(r["batch"], r["precision"], r["res"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2])):
        base = index.get((baseline, b, p, res), {})
        cells = []
        for o in others:
            other = index.get((o, b, p, res), {})
            if base.get("status") == "ok" and other.get("status") == "ok":
                cells.append(f"{base['img_per_sec'] / other['img_per_sec']:.2f}x")
                cells.append(f"{100 * (1 - base['peak_gib'] / other['peak_gib']):+.1f}% less"
                             if base.get("peak_gib") and other.get("peak_gib") else "-")
            else:
                cells += [f"{base.get('status', '-')} / {other.get('status', '-')}", "-"]
        lines.append(f"| {b} | {p} | {res} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, out_dir: Path, title: str) -> list[Path]:
    """One PNG per (batch, precision): img/s (log) and peak memory against resolution, a line per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    for b, p in sorted({(r["batch"], r["precision"]) for r in rows}):
        sel = [r for r in rows if r["batch"] == b and r["precision"] == p]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for model in dict.fromkeys(r["model"] for r in sel):
            ok = [r for r in sel if r["model"] == model and r["status"] == "ok"]
            axes[0].plot([r["res"] for r in ok], [r["img_per_sec"] for r in ok], "o-", label=model)
            if ok and "peak_gib" in ok[0]:
                axes[1].plot([r["res"] for r in ok], [r["peak_gib"] for r in ok], "o-", label=model)
            for r in sel:
                if r["model"] == model and r["status"] == "OOM":
                    axes[1].annotate(f"{model} OOM", (r["res"], 0), textcoords="offset points", xytext=(0, 10),
                                     rotation=90, fontsize=7)
        axes[0].set(yscale="log", xlabel="resolution (px)", ylabel="images / s (log)", title="throughput")
        axes[1].set(xlabel="resolution (px)", ylabel="peak GiB", title="GPU memory")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{title}: batch {b}, {p}")
        fig.tight_layout()
        path = out_dir / f"{title}_b{b}_{p}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _runnable(models, device) -> tuple[dict, dict]:
    """The models whose pinned kernel runs on `device`, and why each other one was left out (kernel=cuda on a CPU)."""
    keep, skipped = {}, {}
    for key, spec in models.items():
        kernel = spec.get("kernel")
        try:
            if kernel not in (None, "auto", "torch") and device.type != "cuda":
                raise VimexpError(f"kernel={kernel!r} needs a CUDA GPU, the benchmark runs on {device.type}")
            if kernel is not None:
                backend(kernel)
            keep[key] = OmegaConf.to_container(spec)
        except VimexpError as e:
            skipped[key] = str(e)
            print(f"skipping {key}: {e}", flush=True)
    return keep, skipped


def run(cfg) -> dict:
    device = pick_device(cfg.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = cfg.bench
    models, skipped = _runnable(b.models, device)
    spin_up(device, cfg.spinup_s)
    rows = []
    configs = list(itertools.product(b.precisions, b.batch_sizes, b.resolutions, models.items()))
    for precision, batch, res, (key, spec) in tqdm(configs, desc="bench", unit="config"):
        row = measure(key, spec, res, batch, precision, cfg, device)
        rows.append(row)
        speed = (f"{row['img_per_sec']:9.1f} img/s  {row.get('peak_gib', float('nan')):6.2f} GiB"
                 if row["status"] == "ok" else row["status"])
        say(f"{key:16s} {res:5d}px  batch {batch:4d}  {precision}: {speed}")
    record = {"bench": b.name, "environment": environment(device),
              "protocol": {k: cfg[k] for k in ("spinup_s", "warmup", "repeats", "iters", "kernel", "cuda_graph",
                                               "compile")} | {"mode": b.mode},
              "command": command(), "skipped": skipped, "rows": rows}
    write_json(out / "results.json", record)
    with open(out / "results.csv", "w", newline="") as f:
        keys = ["model", "res", "batch", "precision", "mode", "neck", "cuda_graph", "compile", "status", "img_per_sec",
                "ms_per_batch", "peak_gib", "params"]
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = ratio_table(rows, b.baseline) if b.baseline and len(models) > 1 else ""
    if table:
        (out / "ratios.md").write_text(table + "\n")
        print(table)
    plot(rows, out, b.name)
    print(f"results in {out.resolve()} (results.json, results.csv, ratios.md, *.png)")
    return record
