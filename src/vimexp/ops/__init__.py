"""The kernels of the Vim mixer behind one object, `backend(kernel)`, which models hold and call:
- `cuda`: mamba-ssm + causal-conv1d, the reference GPU path;
- `fused`: the bimamba v2 mixer in this project's Triton kernels (vimexp.ops.fused_mixer), in inference and in
  training, every other op (add + RMSNorm, the Table 4-5 mixer variants) on the cuda path; `auto` picks it on compute
  capability 9.0, where it was measured faster (docs/optimisation.md);
- `fused_inference`: the Triton mixer where no gradient is taken, mamba-ssm where one is;
- `torch`: plain PyTorch, any device.

The cuda and torch ops take the same arguments as mamba-ssm's functions, so the model code is written once. The
backend owns the fallbacks: a strict backend (a kernel the user named) raises in one line where its kernels can't
take a state size or a shape; `auto`'s quietly runs mamba-ssm there instead.
"""
import functools
import os
import shutil
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
            return "fused" if fused_reason is None and torch.cuda.get_device_capability() == (9, 0) else "cuda"
        reason = fused_reason
    if reason is None:
        return kernel
    if kernel != "auto":
        raise VimexpError(f"kernel={kernel!r} can't run: {reason}; use kernel=torch, or on a GPU machine "
                          "`pip install -e '.[cuda]'`")
    return "torch"


class KernelBackend:
    """A resolved kernel path (`name`: cuda | fused | fused_inference | torch). `ops` holds selective_scan,
    causal_conv1d, rms_norm and (cuda only, else None) mixer_branch, the fused conv-projections-scan of one mixer
    direction; the fused paths also run the bimamba v2 mixer whole through `bimixer` where `runs_fused` says so."""

    def __init__(self, name: str, strict: bool = True):
        self.name, self.strict = name, strict

    def __repr__(self):
        return f"KernelBackend({self.name!r}, strict={self.strict})"

    @functools.cached_property
    def ops(self) -> SimpleNamespace:
        return _torch_ops() if self.name == "torch" else _cuda_ops()

    def for_state_size(self, d_state: int) -> "KernelBackend":
        """The backend a mixer of this state size runs on: the Triton kernels tile the states (a power of two)."""
        if not self.name.startswith("fused") or d_state & (d_state - 1) == 0:
            return self
        if self.name == "fused" and self.strict:
            raise VimexpError(f"kernel='fused' needs a power-of-two d_state, not {d_state}: use kernel=cuda")
        return KernelBackend("cuda", self.strict)

    def runs_fused(self, batch: int, length: int, d_inner: int, d_state: int, dt_rank: int) -> bool:
        """Whether this call of a bimamba v2 mixer runs on the Triton kernels: on `fused`, and on `fused_inference`
        without gradients, where the shape fits their 32-bit offsets and grid."""
        if not (self.name == "fused" or (self.name == "fused_inference" and not torch.is_grad_enabled())):
            return False
        from vimexp.ops import fused_mixer
        if fused_mixer.fits(batch, length, d_inner, d_state, dt_rank):
            return True
        if self.name == "fused" and self.strict:
            raise VimexpError(f"kernel='fused': batch {batch} x {length} tokens is too large for its 32-bit offsets "
                              "and grid; use a smaller batch or kernel=fused_inference/cuda")
        return False

    def bimixer(self, *args):
        """The whole bimamba v2 mixer between in_proj and out_proj (see fused_mixer.bimixer_channel_last)."""
        from vimexp.ops import fused_mixer
        return fused_mixer.bimixer_channel_last(*args)


def backend(kernel: str = "auto", strict: bool | None = None) -> KernelBackend:
    """Resolve a kernel name once, here, for this machine. strict (default: any kernel but auto) makes shapes and
    state sizes the kernels can't take an error instead of a quiet fallback to mamba-ssm."""
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

    def causal_conv1d_cuda(x, weight, bias=None, activation=None):
        # the kernel wants weight and bias in the activation dtype (bf16 under autocast)
        return causal_conv1d_fn(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                activation=activation)

    return SimpleNamespace(selective_scan=selective_scan_fn, causal_conv1d=causal_conv1d_cuda, rms_norm=rms_norm_fn,
                           mixer_branch=mixer_branch)
