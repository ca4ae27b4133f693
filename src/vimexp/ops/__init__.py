"""The kernels of the Vim mixer behind one object, `backend(kernel)`, which models hold and call:
- `fused`: this project's Triton kernels, which ship with torch (no compiler-built extension): the bimamba v2 mixer
  (vimexp.ops.fused_mixer) and add + RMSNorm (vimexp.ops.fused_norm), in inference and in training. The Table 4-5
  mixer variants have no Triton kernel: they run on mamba-ssm where it is installed, else on plain PyTorch (said once);
- `cuda`: mamba-ssm + causal-conv1d, the reference GPU path (the `[cuda]` extra, compiled from source);
- `fused_inference`: the Triton mixer where no gradient is taken, mamba-ssm where one is;
- `torch`: plain PyTorch, any device;
- `auto`: `fused` on compute capability 9.0, where it was measured faster (docs/optimisation.md), and on 8.x
  without mamba-ssm; `cuda` on other GPUs with mamba-ssm; else `torch`.

The ops take the same arguments as mamba-ssm's functions, so the model code is written once. The backend owns the
fallbacks: a strict backend (a kernel the user named) raises in one line where its kernels can't take a state size or
a shape; `auto`'s quietly runs the reference path (mamba-ssm, else PyTorch) there instead.
"""
import functools
import os
import shutil
import sys
from types import SimpleNamespace

import torch

from vimexp import VimexpError

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
    """Why the Triton kernels can't run here, or None."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"import triton failed ({type(e).__name__}: {e})"
    if not (os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))):
        return "Triton finds no C compiler (cc, gcc or clang) to build its kernel launcher"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"its Triton kernels need compute capability 8.0+, not {torch.cuda.get_device_capability()}"
    return None


def _auto() -> str:
    if not torch.cuda.is_available():
        return "torch"
    mamba_ok, fused_ok = cuda_unavailable_reason() is None, _fused_unavailable_reason() is None
    if fused_ok and (torch.cuda.get_device_capability() == (9, 0) or not mamba_ok):
        return "fused"
    return "cuda" if mamba_ok else "torch"


def resolve_kernel(kernel: str) -> str:
    """The kernel path `kernel` runs on this machine; a named one that can't run raises with the reason."""
    if kernel not in KERNELS:
        raise VimexpError(f"unknown kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    if kernel in ("torch", "auto"):
        return _auto() if kernel == "auto" else "torch"
    if kernel == "cuda":
        reason, fix = cuda_unavailable_reason(), "`pip install -e '.[cuda]'` (compiles mamba-ssm), or kernel=fused"
    elif kernel == "fused":
        reason, fix = _fused_unavailable_reason(), "kernel=torch"
    else:  # fused_inference trains on mamba-ssm
        reason, fix = _fused_unavailable_reason() or cuda_unavailable_reason(), "kernel=fused"
    if reason is not None:
        raise VimexpError(f"kernel={kernel!r} can't run: {reason}; use {fix}")
    return kernel


def _reference() -> str:
    """Where the fused path sends what its Triton kernels don't take: mamba-ssm, else PyTorch."""
    return "cuda" if cuda_unavailable_reason() is None else "torch"


class KernelBackend:
    """A resolved kernel path (`name`: cuda | fused | fused_inference | torch). `ops` holds selective_scan,
    causal_conv1d, rms_norm and (on mamba-ssm, else None) mixer_branch, the fused conv-projections-scan of one mixer
    direction; the fused paths also run the bimamba v2 mixer whole through `bimixer` where `runs_fused` says so."""

    def __init__(self, name: str, strict: bool = True):
        self.name, self.strict = name, strict

    def __repr__(self):
        return f"KernelBackend({self.name!r}, strict={self.strict})"

    @functools.cached_property
    def ops(self) -> SimpleNamespace:
        return {"torch": _torch_ops, "cuda": _cuda_ops}.get(self.name, _fused_ops)()

    def for_state_size(self, d_state: int) -> "KernelBackend":
        """The backend a mixer of this state size runs on: the Triton kernels tile the states (a power of two)."""
        if not self.name.startswith("fused") or d_state & (d_state - 1) == 0:
            return self
        if self.name == "fused" and self.strict:
            raise VimexpError(f"kernel='fused' needs a power-of-two d_state, not {d_state}: use kernel=cuda or torch")
        _note_once(f"kernel={self.name}: d_state {d_state} is no power of two, which the Triton kernels need: those "
                   f"mixers run on the {_reference()} path")
        return KernelBackend(_reference(), self.strict)

    def runs_fused(self) -> bool:
        """Whether a bimamba v2 mixer runs on the Triton kernels now: on `fused` always (a batch too large for one
        launch runs as several), on `fused_inference` where no gradient is taken."""
        return self.name == "fused" or (self.name == "fused_inference" and not torch.is_grad_enabled())

    def bimixer(self, *args):
        """The whole bimamba v2 mixer between in_proj and out_proj (see fused_mixer.bimixer_channel_last)."""
        from vimexp.ops import fused_mixer
        return fused_mixer.bimixer_channel_last(*args)


def backend(kernel: str = "auto", strict: bool | None = None) -> KernelBackend:
    """Resolve a kernel name once, here, for this machine. strict (default: any kernel but auto) makes a state size
    the Triton kernels can't take an error instead of a fallback to mamba-ssm or PyTorch (said once)."""
    return KernelBackend(resolve_kernel(kernel), kernel != "auto" if strict is None else strict)


@functools.cache
def _torch_ops() -> SimpleNamespace:
    from vimexp.ops.causal_conv import causal_conv1d_torch
    from vimexp.ops.norm import rms_norm_torch
    from vimexp.ops.selective_scan import selective_scan_torch
    return SimpleNamespace(selective_scan=selective_scan_torch, causal_conv1d=causal_conv1d_torch,
                           rms_norm=rms_norm_torch, mixer_branch=None)


@functools.cache
def _cuda_ops() -> SimpleNamespace:
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    from vimexp.ops.mixer_branch import mixer_branch
    from vimexp.ops.norm import scaled

    def causal_conv1d_cuda(x, weight, bias=None, activation=None):
        # the kernel wants weight and bias in the activation dtype (bf16 under autocast)
        return causal_conv1d_fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                activation=activation)

    def rms_norm_cuda(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                      x_scale=None):
        return rms_norm_fn(scaled(x, x_scale), weight, bias, residual=residual, eps=eps, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32)

    return SimpleNamespace(selective_scan=selective_scan_fn, causal_conv1d=causal_conv1d_cuda, rms_norm=rms_norm_cuda,
                           mixer_branch=mixer_branch)


@functools.cache
def _fused_ops() -> SimpleNamespace:
    """The Triton add + RMSNorm; the reference path's conv and scan for the mixers the Triton kernels don't run."""
    from vimexp.ops.fused_norm import rms_norm_triton
    if _reference() == "cuda":
        return SimpleNamespace(**{**vars(_cuda_ops()), "rms_norm": rms_norm_triton})
    note = ("kernel=fused: a mixer its Triton kernels don't take (bimamba none/v1 of Tables 4-5, or a state size "
            "they can't tile) runs on plain PyTorch, slow on a GPU; `pip install -e '.[cuda]'` runs it on mamba-ssm "
            "instead")
    ops = _torch_ops()
    return SimpleNamespace(selective_scan=_noting(ops.selective_scan, note), causal_conv1d=ops.causal_conv1d,
                           rms_norm=rms_norm_triton, mixer_branch=None)


def _noting(fn, note: str):
    """fn, which has `note` said the first time it runs."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _note_once(note)
        return fn(*args, **kwargs)
    return wrapped


@functools.cache
def _note_once(note: str):
    """A fallback said once a process, on stderr."""
    print(f"note: {note}", file=sys.stderr)
