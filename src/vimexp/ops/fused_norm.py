"""Add + RMSNorm in Triton, as a torch custom op (`vimexp::rms_norm`): what the fused path uses between the mixers,
so that it needs nothing beyond torch and Triton. Same arguments and results as vimexp.ops.norm.rms_norm_torch
(and mamba-ssm's rms_norm_fn, which the cuda path uses):

    s = x x_scale + residual (in the residual's dtype; float32 with residual_in_fp32),  out = s / rms(s) * weight

x_scale, one factor a sample (drop path's), is applied as x * x_scale in x's dtype would be: fused here, it saves
drop path's two passes over the hidden states a block (forward and backward; 1.2% of a Vim-Ti training step, H200).

Forward: one program a tile of rows. Backward: each program walks a range of rows, a few at a time, and keeps its share of
the weight's gradient in registers, summed over programs at the end (an (N, programs) float32 buffer).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from vimexp.ops.custom_ops import eager_fast

FWD_ELEMENTS, FWD_WARPS = 2048, 8  # the forward: rows a program x the row rounded up to a power of 2, and warps.
# Against one row a program (256, 4 warps), kernel alone, H200: 0.84x Vim-Ti at 1248 px batch 8, 0.83x batch 64,
# 0.75x Vim-Ti training batch 128, 0.99x Vim-S (experiments/results/fused_scan/h200/norm_rows/norm_forward.json)
BWD_PROGRAMS = 512  # the backward's programs: enough to fill an H200 (132 SMs) several times over


@triton.jit
def _rms_norm_fwd(X, XS, R, W, Y, S, RSTD, M, N, SAMPLE_ROWS, eps, HAS_SCALE: tl.constexpr,
                  HAS_RESIDUAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    at = rows[:, None] * N + cols[None, :]
    s = tl.load(X + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:  # rounded as x * x_scale in x's dtype
        xs = tl.load(XS + rows // SAMPLE_ROWS, mask=rows < M, other=0.0).to(tl.float32)
        s = (s * xs[:, None]).to(X.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(R + at, mask=ok, other=0.0).to(tl.float32)
    s = s.to(S.dtype.element_ty)  # the sum as stored (and as the reference normalises it)
    tl.store(S + at, s, mask=ok)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=rows < M)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + at, s * rstd[:, None] * w[None, :], mask=ok)


@triton.jit
def _rms_norm_bwd(DY, DS, S, W, RSTD, XS, DX, DR, DW, M, N, ROWS, SAMPLE_ROWS, HAS_DS: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_DR: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """d(sum) = rstd (w dy - s_hat mean(s_hat w dy)) (+ the gradient reaching the sum directly, with prenorm),
    written to DR (the residual's dtype) and, times x_scale, to DX (x's dtype; rounded to it first, as an unfused
    multiply's gradient would be); DW gets this program's sum of dy s_hat. BR rows a step: one row a step left
    each program waiting on its loads (0.23 ms a Vim-S layer at batch 128, H200)."""
    cols = tl.arange(0, BN)
    ok = cols < N
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BN], tl.float32)
    start = tl.program_id(0) * ROWS
    end = tl.minimum(start + ROWS, M)
    for r0 in range(start, end, BR):
        row = r0 + tl.arange(0, BR)
        row_ok = row < end
        tile = row[:, None] * N + cols[None, :]
        tile_ok = row_ok[:, None] & ok[None, :]
        rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)[:, None]
        s_hat = tl.load(S + tile, mask=tile_ok, other=0.0).to(tl.float32) * rstd
        dy = tl.load(DY + tile, mask=tile_ok, other=0.0).to(tl.float32)
        wdy = w[None, :] * dy
        dx = (wdy - s_hat * (tl.sum(s_hat * wdy, axis=1) / N)[:, None]) * rstd
        if HAS_DS:
            dx += tl.load(DS + tile, mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_DR:
            tl.store(DR + tile, dx, mask=tile_ok)
        if HAS_SCALE:
            scale = tl.load(XS + row // SAMPLE_ROWS, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            dx = dx.to(DX.dtype.element_ty).to(tl.float32) * scale
        tl.store(DX + tile, dx, mask=tile_ok)
        dw += tl.sum(dy * s_hat, axis=0)
    tl.store(DW + cols * tl.num_programs(0) + tl.program_id(0), dw, mask=ok)  # (N, programs): summed along rows


def _sum_dtype(x, residual, residual_in_fp32: bool) -> torch.dtype:
    return residual.dtype if residual is not None else torch.float32 if residual_in_fp32 else x.dtype


def _forward_impl(x: torch.Tensor, x_scale: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  weight: torch.Tensor, eps: float, residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """(out, sum, rstd) of rows x (M, N) (times x_scale, one factor a sample of M / len(x_scale) rows,
    + residual)."""
    m, n = x.shape
    y = torch.empty_like(x)
    s = torch.empty(m, n, device=x.device, dtype=_sum_dtype(x, residual, residual_in_fp32))
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    bn = triton.next_power_of_2(n)
    bm = max(1, FWD_ELEMENTS // bn)
    _rms_norm_fwd[(triton.cdiv(m, bm),)](x, x_scale, residual, weight, y, s, rstd, m, n, _sample_rows(m, x_scale),
                                         eps, HAS_SCALE=x_scale is not None, HAS_RESIDUAL=residual is not None,
                                         BM=bm, BN=bn, num_warps=FWD_WARPS)
    return y, s, rstd


def _sample_rows(m: int, x_scale: Optional[torch.Tensor]) -> int:
    return 1 if x_scale is None else m // x_scale.shape[0]


_rms_norm = torch.library.custom_op("vimexp::rms_norm", _forward_impl, mutates_args=())


@_rms_norm.register_fake
def _(x, x_scale, residual, weight, eps, residual_in_fp32):
    s = x.new_empty(x.shape, dtype=_sum_dtype(x, residual, residual_in_fp32))
    return torch.empty_like(x), s, x.new_empty(x.shape[:1], dtype=torch.float32)


def _backward_impl(dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor,
                   rstd: torch.Tensor, x_scale: Optional[torch.Tensor], x_dtype: torch.dtype,
                   residual_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dresidual (empty without a residual: an op returns no None), dweight)."""
    m, n = s.shape
    dx = torch.empty(m, n, device=s.device, dtype=x_dtype)
    dr = torch.empty(0 if residual_dtype is None else m, n, device=s.device, dtype=residual_dtype or x_dtype)
    programs = max(1, min(m, BWD_PROGRAMS))
    rows = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows)
    dw = torch.empty(n, programs, device=s.device, dtype=torch.float32)
    ds = None if ds is None else ds.contiguous()  # autograd may hand a broadcast zero
    bn = triton.next_power_of_2(n)
    _rms_norm_bwd[(programs,)](dy.contiguous(), ds, s, weight, rstd, x_scale, dx, dr, dw, m, n, rows,
                               _sample_rows(m, x_scale), HAS_DS=ds is not None, HAS_SCALE=x_scale is not None,
                               HAS_DR=residual_dtype is not None, BR=max(1, 2048 // bn), BN=bn)
    return dx, dr, dw.sum(1).to(weight.dtype)  # summed along rows: 11 us a norm along columns (H200, 512 x 192)


_rms_norm_backward = torch.library.custom_op("vimexp::rms_norm_backward", _backward_impl, mutates_args=())


@_rms_norm_backward.register_fake
def _(dy, ds, s, weight, rstd, x_scale, x_dtype, residual_dtype):
    dr = s.new_empty((0 if residual_dtype is None else s.shape[0], s.shape[1]), dtype=residual_dtype or x_dtype)
    return s.new_empty(s.shape, dtype=x_dtype), dr, torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, x_scale, residual, weight, _, _ = inputs
    _, s, rstd = output
    ctx.save_for_backward(s, weight, rstd, x_scale)
    ctx.x_dtype, ctx.residual_dtype = x.dtype, None if residual is None else residual.dtype


def _backward(ctx, dy, ds, _drstd):
    s, weight, rstd, x_scale = ctx.saved_tensors
    if dy is None:  # (the norm's output unused)
        dy = torch.zeros(s.shape, device=s.device, dtype=ctx.x_dtype)
    backward = _backward_impl if getattr(ctx, "eager", False) else _rms_norm_backward
    dx, dr, dw = backward(dy, ds, s, weight, rstd, x_scale, ctx.x_dtype, ctx.residual_dtype)
    return dx, None, dr if ctx.residual_dtype is not None else None, dw, None, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)
rms_norm = eager_fast(_rms_norm, _forward_impl, _setup_context, _backward, differentiable=2)


def rms_norm_triton(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                    x_scale=None):
    """out = RMSNorm(x x_scale + residual), x_scale one factor a sample (x's first axis); with prenorm also returns
    the sum (float32 if residual_in_fp32)."""
    if bias is not None:
        raise NotImplementedError("the Triton RMSNorm has no bias (Vim's norms have none)")
    shape = x.shape
    flat = lambda t: None if t is None else t.reshape(-1, shape[-1]).contiguous()  # noqa: E731
    out, s, _ = rms_norm(flat(x), x_scale, flat(residual), weight, eps, residual_in_fp32)
    return (out.view(shape), s.view(shape)) if prenorm else out.view(shape)
