"""The bimamba v2 mixer alone (in_proj -> both directions -> out_proj) at Vim's shapes, bf16 autocast, one GPU:
kernel=cuda (mamba-ssm, the reference) against kernel=fused (vimexp.ops.fused_mixer).

    python -m vimexp.bench bench=mixer [bench.sweep=true] [bench.shapes=[vim_ti_1248_b8]]

Per shape: inference forward and training forward+backward ms (the median of `repeats` timings, vimexp.bench.timing),
the speed-up, and the fused scans alone, forward (the two-pass training one and the one-pass inference one, in the
same run): their achieved bandwidth (the bytes a scan has to move / its time) and state-update rate (batch x tokens
x channels x states x 2 directions / its time), to set beside the chip's limits. bench.sweep=true times every
Triton block configuration of the scan and conv kernels at every shape, each passed to the kernels as a
fused_mixer.Blocks (the tuned tables stay as they are), and the one-pass scan's launches (SWEEP_LANES), and keeps
them all in the record.
Writes results.json to out_dir.
"""
import json
from pathlib import Path

import torch
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.bench import command, pick_device, say
from vimexp.bench.timing import median_ms, spin_up
from vimexp.models.vim import VimMixer
from vimexp.ops import KernelBackend
from vimexp.ops import fused_mixer as fm
from vimexp.record import environment, write_json

SHAPES = {"vim_ti_1248_b8": (8, 6085, 192), "vim_s_224_b128": (128, 197, 384), "vim_ti_224_b128": (128, 197, 192),
          "vim_ti_1248_b64": (64, 6085, 192), "vim_ti_1024_b64": (64, 4097, 192)}
# the channel-last kernels' blocks: channels a program, tokens a chunk, warps (a lane owns BD / (32 warps) channels);
# "train" sweeps the backward kernel's blocks (the forward's are the tuned ones)
SWEEP_SEQ = {"inference": [dict(BD=bd, num_warps=w) for bd in (32, 64, 128) for w in (1, 2, 4) if bd >= 32 * w],
             "train": [dict(BD=bd, num_warps=w) for bd, w in [(16, 1), (32, 1), (64, 1), (64, 2)]]}
# the conv kernels' tiles (channels x tokens; _conv_fwd and _conv_bwd_dx), timed in inference and training
SWEEP_CONV = [dict(BE=be, BT=bt) for be in (32, 64, 128) for bt in (16, 32, 64) if be * bt <= 4096]
# the inference scan's launches (scan_one_pass): warps (8 channels each), register sets, L2 prefetch distance
SWEEP_LANES = [dict(num_warps=w, SETS=s, PF=pf) for w in (1, 2) for s in (2, 3, 4) for pf in (0, 8)]
TABLES = ("SEQ", "SEQ_LONG", "SEQ_BWD", "CONV_BLOCK", "CONV_DPRE", "LANES")  # fused_mixer.Blocks' fields, as tables


class BlocksBackend(KernelBackend):
    """The fused backend with its kernels launched at `blocks` instead of the tuned ones."""

    def __init__(self, blocks: fm.Blocks):
        super().__init__("fused")
        self.blocks = blocks

    def bimixer(self, *args):
        return fm.bimixer_channel_last(*args, blocks=self.blocks)


def mixer_steps(kernel: str | KernelBackend, shape):
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


def scan_kernel_alone(shape, timing: dict, blocks: fm.Blocks | None = None, sweep_lanes: bool = False) -> dict:
    """The inference scans by themselves on bf16 inputs, both directions: the two-pass fused_mixer.scan_seq (the
    training forward's) and the one-pass scan_one_pass (inference's, at its tuned launch, and with sweep_lanes at
    each of SWEEP_LANES), timed in the same run. Each: its time, its effective bandwidth (the least traffic a fused
    scan needs: u, dt, B, C of both directions, z and the output once each, over its time) and its state-update
    rate."""
    from vimexp.ops import scan_one_pass
    batch, length, dim = shape
    e, n = 2 * dim, 16
    bl = batch * length
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    xc, dt, xz = torch.randn(2, bl, e, **bf), torch.randn(2, bl, e, **bf) - 4, torch.randn(bl, 2 * e, **bf)
    bc = torch.randn(2, bl, 2 * n, device="cuda")
    A = -torch.rand(2, e, n, device="cuda") * 15 - 1
    at = A.transpose(1, 2).contiguous()  # as the two-pass scan reads it
    D, bias = torch.randn(2, e, device="cuda"), torch.randn(2, e, device="cuda")
    bc_padded = scan_one_pass.padded_bc(bc)
    nbytes = 2 * bl * (4 * e + 4 * n + 2 * e)
    updates = 2 * batch * length * e * n

    def timed(fn, config) -> dict:
        ms = median_ms(fn, torch.device("cuda"), **timing)
        return {"ms": ms, "config": config, "tb_per_s": nbytes / ms / 1e9, "updates_per_s_T": updates / ms / 1e9}

    def one_pass(config):
        return lambda: scan_one_pass.scan_one_pass(xc, bc_padded, dt, xz[:, e:], A, D, bias, batch, config)
    tuned = scan_one_pass.launch_config(batch, e, (blocks or fm.tuned()).lanes)
    row = {"least_bytes": nbytes,
           "two_pass": timed(lambda: fm.scan_seq(xc, bc, dt, xz[:, e:], at, D, bias, batch, blocks),
                             fm.seq_config(length, blocks)),
           "one_pass": timed(one_pass(tuned), tuned)}
    row["one_pass_speedup"] = row["two_pass"]["ms"] / row["one_pass"]["ms"]
    if sweep_lanes:
        row["sweep_lanes"] = [timed(one_pass(c), c) for c in SWEEP_LANES]
    return row


def sweep(shape, configs, table: str, modes: tuple[str, ...], timing: dict) -> list[dict]:
    """Each configuration (entries of the fused_mixer.Blocks field `table`, the others tuned) timed in each of
    `modes`; the first mode's time is the row's "ms", the one the printed ranking sorts by."""
    rows = []
    for cfg in configs:
        try:
            blocks = fm.with_blocks(**{table: cfg})
            steps = dict(zip(("inference", "train"), mixer_steps(BlocksBackend(blocks), shape)))
            times = {f"{m}_ms": median_ms(steps[m], torch.device("cuda"), **timing) for m in modes}
            if table == "seq_bwd":  # the register cap the launch chose (SEQ_BWD's WAVE_MAXNREG)
                launch = fm._seq_launch(shape[0], shape[1], 2 * shape[2], backward=True, blocks=blocks)[0]
                cfg = {**cfg, "maxnreg": launch.get("maxnreg")}
            rows.append({**cfg, "ms": times[f"{modes[0]}_ms"], **times})
        except Exception as e:  # a configuration that doesn't compile (registers, shared memory) is recorded
            rows.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return rows


def run(cfg) -> dict:
    b = cfg.bench
    device = pick_device(cfg.device)
    if device.type != "cuda":
        raise VimexpError("bench=mixer times mamba-ssm against the Triton kernels: it needs a CUDA GPU")
    unknown = [s for s in b.shapes if s not in SHAPES]
    if unknown:
        raise VimexpError(f"unknown bench.shapes {unknown}: choose from {', '.join(SHAPES)}")
    timing = {"warmup": cfg.warmup, "repeats": cfg.repeats, "iters": cfg.iters}
    record = {"environment": environment(device), "command": command(),
              "protocol": {"spinup_s": cfg.spinup_s, **timing},
              "shape": "(batch, tokens, d_model); E = 2 d_model channels, 16 states",
              "configs": {name: dict(table) for name, table in zip(TABLES, fm.tuned())}, "rows": []}
    spin_up(device, cfg.spinup_s)
    for name in tqdm(b.shapes, desc="bench", unit="shape"):
        shape = SHAPES[name]
        row = {"shape_name": name, "shape": list(shape)}
        if b.sweep:
            forward = fm.seq_table(shape[1])  # the blocks of this length's forward
            row["sweep_seq"] = {"inference": sweep(shape, SWEEP_SEQ["inference"], forward, ("inference",), timing),
                                "train": sweep(shape, SWEEP_SEQ["train"], "seq_bwd", ("train",), timing),
                                "conv": sweep(shape, SWEEP_CONV, "conv", ("inference", "train"), timing)}
        for kernel in ("cuda", "fused"):
            infer, train = mixer_steps(kernel, shape)
            row[kernel] = {"inference_ms": median_ms(infer, device, **timing),
                           "train_ms": median_ms(train, device, **timing)}
            torch.cuda.empty_cache()
        row["speedup"] = {m: row["cuda"][f"{m}_ms"] / row["fused"][f"{m}_ms"] for m in ("inference", "train")}
        row["fused_inference_scan"] = scan_kernel_alone(shape, timing, sweep_lanes=b.sweep)
        record["rows"].append(row)
        say(json.dumps({k: v for k, v in row.items() if not k.startswith("sweep")}))
        if b.sweep:
            for mode, rows in row["sweep_seq"].items():
                ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
                best = [(*(v for k, v in r.items() if not k.endswith("ms")), round(r["ms"], 3)) for r in ok[:5]]
                say(f"{mode} {best}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", record)
    print(f"results in {(out / 'results.json').resolve()}")
    return record
