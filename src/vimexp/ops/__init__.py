"""Kernels of the Vim mixer behind one switch:
- `cuda`: mamba-ssm + causal-conv1d, the reference GPU path;
- `fused`: the cuda path with the bimamba v2 mixer in this project's Triton kernels (vimexp.ops.fused_mixer), in
  inference and in training: faster than mamba-ssm in both on the H100 (experiments/results/fused_scan/), so `auto`
  picks it on compute capability 9.0 (where a shape doesn't fit the kernels, auto's mixers run mamba-ssm instead);
- `fused_inference`: the Triton mixer where no gradient is taken, mamba-ssm where one is;
- `torch`: plain PyTorch, any device.

The cuda and torch paths take the same arguments as mamba-ssm's functions, so the model code is written once.
"""
import functools
import os
import shutil
from types import SimpleNamespace

import torch

from vimexp import VimexpError
from vimexp.ops.causal_conv import causal_conv1d_torch
from vimexp.ops.norm import rms_norm_torch
from vimexp.ops.selective_scan import selective_scan_torch

KERNELS = ("auto", "cuda", "fused", "fused_inference", "torch")


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why the cuda kernels can't run here, or None if they can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    for module in ("mamba_ssm.ops.selective_scan_interface", "causal_conv1d", "mamba_ssm.ops.triton.layer_norm"):
        try:
            __import__(module)
        except Exception as e:  # ImportError, or an extension built against another torch (undefined symbol)
            return f"import {module} failed ({type(e).__name__}: {e})"
    return None


def _fused_unavailable_reason() -> str | None:
    """Why the Triton mixer can't run on this (CUDA) machine, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"import triton failed ({type(e).__name__}: {e})"
    if not (os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))):
        return "Triton finds no C compiler (cc, gcc or clang) to build its kernel launcher"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"its Triton kernels need compute capability 8.0+, not {torch.cuda.get_device_capability()}"
    return None


def resolve_kernel(kernel: str) -> str:
    """'auto' -> 'fused' on compute capability 9.0, 'cuda' on other GPUs where the kernels import, else
    'torch'; the others raise with the reason when they can't run."""
    if kernel not in KERNELS:
        raise VimexpError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch"
    reason = cuda_unavailable_reason()
    if kernel in ("auto", "fused", "fused_inference") and reason is None:
        fused_reason = _fused_unavailable_reason()
        if kernel == "auto":
            return "fused" if fused_reason is None and torch.cuda.get_device_capability() == (9, 0) \
                else "cuda"
        reason = fused_reason
    if reason is None:
        return kernel
    if kernel != "auto":
        raise VimexpError(f"kernel={kernel!r} can't run: {reason}; use kernel=torch, or on a GPU machine "
                          "`pip install -e '.[cuda]'`")
    return "torch"


@functools.cache
def get_ops(kernel: str) -> SimpleNamespace:
    """selective_scan, causal_conv1d, rms_norm and (cuda only, else None) mixer_branch, the fused conv-projections-scan
    of one mixer direction, for a resolved kernel name (the fused kernels run every op but the v2 mixer on the cuda
    path)."""
    if kernel.startswith("fused"):
        return get_ops("cuda")
    if kernel == "torch":
        return SimpleNamespace(selective_scan=selective_scan_torch, causal_conv1d=causal_conv1d_torch,
                               rms_norm=rms_norm_torch, mixer_branch=None)
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    from vimexp.ops.mixer_branch import mixer_branch

    def causal_conv1d_cuda(x, weight, bias=None, activation=None):
        # the kernel wants weight and bias in the activation dtype (bf16 under autocast)
        return causal_conv1d_fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                activation=activation)

    return SimpleNamespace(selective_scan=selective_scan_fn, causal_conv1d=causal_conv1d_cuda, rms_norm=rms_norm_fn,
                           mixer_branch=mixer_branch)
