"""The bimamba v2 mixer alone (in_proj -> both directions -> out_proj) at Vim's shapes, bf16 autocast, one GPU:
kernel=cuda (mamba-ssm, the reference) against kernel=fused (vimexp.ops.fused_mixer).

    python -m vimexp.bench_mixer [--sweep] [--out FILE.json]

Per shape: inference forward and training forward+backward ms (median of CUDA-event timings), the speed-up, and the
fused scan kernel alone, forward: its achieved bandwidth (the bytes it has to move / its time) and state-update
rate (batch x tokens x channels x states x 2 directions / its time), to set beside the chip's limits. --sweep times
every Triton block configuration of the scan and conv kernels at every shape and keeps them all in the record.
"""
import argparse
import json
import statistics

import torch

from vimexp.bench import environment, spin_up
from vimexp.models.vim import VimMixer
from vimexp.ops import fused_mixer as fm

SHAPES = {"vim_ti_1248_b8": (8, 6085, 192), "vim_s_224_b128": (128, 197, 384), "vim_ti_224_b128": (128, 197, 192)}
# the channel-last kernels' blocks: channels a program, tokens a chunk, warps (a lane owns BD / (32 warps) channels);
# "train" sweeps the backward kernel's blocks (the forward's are SEQ)
SWEEP_SEQ = {"inference": [dict(BD=bd, num_warps=w) for bd in (32, 64, 128) for w in (1, 2, 4) if bd >= 32 * w],
             "train": [dict(BD=bd, num_warps=w) for bd, w in [(16, 1), (32, 1), (64, 1), (64, 2)]]}
# the conv kernels' tiles (channels x tokens; _conv_fwd and _conv_bwd_dx), timed in inference and training
SWEEP_CONV = [dict(BE=be, BT=bt) for be in (32, 64, 128) for bt in (16, 32, 64) if be * bt <= 4096]


def time_ms(fn, warmup=3, repeats=15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mixer_steps(kernel: str, shape):
    """(inference, training) closures for one mixer at `shape`, same seed for every kernel."""
    batch, length, dim = shape
    torch.manual_seed(0)
    mixer = VimMixer(dim, kernel=kernel).cuda()
    x = torch.randn(batch, length, dim, device="cuda", requires_grad=True)

    def infer():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            mixer(x)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = mixer(x)
        out.float().sum().backward()
    return infer, train


def scan_kernel_alone(shape) -> dict:
    """The inference scan (both passes of fused_mixer._scan_seq, both directions) by itself on bf16 inputs: its
    time, its effective bandwidth (the least traffic a fused scan needs: u, dt, B, C of both directions, z and
    the output once each, over its time) and its state-update rate."""
    batch, length, dim = shape
    e, n = 2 * dim, 16
    bl = batch * length
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    xc, dt, xz = torch.randn(2, bl, e, **bf), torch.randn(2, bl, e, **bf) - 4, torch.randn(bl, 2 * e, **bf)
    bc = torch.randn(2, bl, 2 * n, device="cuda")
    A = -torch.rand(2, e, n, device="cuda") * 15 - 1
    D, bias = torch.randn(2, e, device="cuda"), torch.randn(2, e, device="cuda")

    def scan():
        fm.scan_seq(xc, bc, dt, xz[:, e:], A, D, bias, batch)
    ms = time_ms(scan)
    nbytes = 2 * bl * (4 * e + 4 * n + 2 * e)
    updates = 2 * batch * length * e * n
    return {"ms": ms, "config": fm.seq_config(length), "least_bytes": nbytes, "tb_per_s": nbytes / ms / 1e9,
            "updates_per_s_T": updates / ms / 1e9}


def sweep(shape, configs, table: dict, modes: tuple[str, ...]) -> list[dict]:
    """Each configuration of `table` (a block dict of fused_mixer) timed in each of `modes`; the first mode's time
    is the row's "ms", the one the printed ranking sorts by."""
    rows = []
    for cfg in configs:
        saved = dict(table)
        table.update(cfg)
        try:
            steps = dict(zip(("inference", "train"), mixer_steps("fused", shape)))
            times = {f"{m}_ms": time_ms(steps[m]) for m in modes}
            rows.append({**cfg, "ms": times[f"{modes[0]}_ms"], **times})
        except Exception as e:  # a configuration that doesn't compile (registers, shared memory) is recorded
            rows.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        table.clear()
        table.update(saved)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true",
                        help="time every block configuration of the scan and conv kernels")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default=None, help="write the record here (JSON)")
    args = parser.parse_args()
    record = {"environment": environment(torch.device("cuda")), "command": "python -m vimexp.bench_mixer "
              + ("--sweep " if args.sweep else "") + " ".join(f"--shapes {s}" for s in args.shapes),
              "shape": "(batch, tokens, d_model); E = 2 d_model channels, 16 states", "configs": {
                  name: dict(getattr(fm, name))
                  for name in ("SEQ", "SEQ_LONG", "SEQ_BWD", "CONV_BLOCK", "CONV_DPRE")},
              "rows": []}
    spin_up(torch.device("cuda"), 3)
    for name in args.shapes:
        shape = SHAPES[name]
        row = {"shape_name": name, "shape": list(shape)}
        if args.sweep:
            forward = fm.seq_config(shape[1])  # the blocks of this length's forward
            row["sweep_seq"] = {"inference": sweep(shape, SWEEP_SEQ["inference"], forward, ("inference",)),
                                "train": sweep(shape, SWEEP_SEQ["train"], fm.SEQ_BWD, ("train",)),
                                "conv": sweep(shape, SWEEP_CONV, fm.CONV_BLOCK, ("inference", "train"))}
        for kernel in ("cuda", "fused"):
            infer, train = mixer_steps(kernel, shape)
            row[kernel] = {"inference_ms": time_ms(infer), "train_ms": time_ms(train)}
            torch.cuda.empty_cache()
        row["speedup"] = {m: row["cuda"][f"{m}_ms"] / row["fused"][f"{m}_ms"] for m in ("inference", "train")}
        row["fused_inference_scan"] = scan_kernel_alone(shape)
        record["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("sweep")}), flush=True)
        if args.sweep:
            for mode, rows in row["sweep_seq"].items():
                ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
                print(mode, [(*(v for k, v in r.items() if not k.endswith("ms")), round(r["ms"], 3)) for r in ok[:5]],
                      flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
