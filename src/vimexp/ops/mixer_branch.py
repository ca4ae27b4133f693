"""One scan direction of the Vim mixer on the cuda kernels as a single autograd node.

causal conv + SiLU -> x_proj -> dt_proj -> selective scan with the SiLU(z) gate. Kept for the backward: the inputs,
x_proj's output, the scan's checkpoints and (unless `recompute`) the conv output; dt is recomputed there (a small
GEMM) and, with `recompute`, the conv output too, as the official fused mixer does. Against separate autograd nodes
for the conv, the projections and the scan this saves the layout copies between them (dt made contiguous, x_dbl
split and its gradient concatenated, reshapes) and, with `recompute`, two (batch, E, L) activations per direction.
"""
import selective_scan_cuda
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function


def _projections(conv_out, x_proj_w, dt_proj_w, dt_rank, d_state):
    """x_dbl (batch*L, dt_rank + 2N) and the scan's delta (batch, E, L), B and C (batch, 1, N, L), L innermost."""
    batch, e, length = conv_out.shape
    x_dbl = F.linear(conv_out.transpose(1, 2).reshape(batch * length, e), x_proj_w)
    delta = (dt_proj_w @ x_dbl[:, :dt_rank].t()).view(e, batch, length).transpose(0, 1)
    B, C = (x_dbl[:, dt_rank + i * d_state: dt_rank + (i + 1) * d_state].view(batch, length, d_state)
            .transpose(1, 2).unsqueeze(1).contiguous() for i in (0, 1))
    return x_dbl, delta, B, C


class MixerBranchFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, dt_rank, d_state, recompute):
        dtype = x.dtype  # the activations' dtype (bf16 under autocast): the GEMMs and the conv run in it
        conv_w, conv_b = conv_w.to(dtype).contiguous(), conv_b.to(dtype).contiguous()
        x_proj_w, dt_proj_w = x_proj_w.to(dtype), dt_proj_w.to(dtype)
        conv_out = causal_conv1d_fwd_function(x, conv_w, conv_b, None, None, None, True)
        x_dbl, delta, B, C = _projections(conv_out, x_proj_w, dt_proj_w, dt_rank, d_state)
        out, checkpoints, out_z = selective_scan_cuda.fwd(conv_out, delta, A, B, C, D, z, dt_bias, True)
        ctx.save_for_backward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, x_dbl, A, B, C, D, dt_bias, checkpoints, out,
                              None if recompute else conv_out)
        ctx.dt_rank, ctx.d_state = dt_rank, d_state
        return out_z

    @staticmethod
    @once_differentiable  # hand-written gradients: a second derivative would be silently wrong
    def backward(ctx, dout_z):
        x, z, conv_w, conv_b, x_proj_w, dt_proj_w, x_dbl, A, B, C, D, dt_bias, checkpoints, out, conv_out = \
            ctx.saved_tensors
        r, n = ctx.dt_rank, ctx.d_state
        batch, e, length = x.shape
        if conv_out is None:  # recompute
            conv_out = causal_conv1d_fwd_function(x, conv_w, conv_b, None, None, None, True)
        delta = (dt_proj_w @ x_dbl[:, :r].t()).view(e, batch, length).transpose(0, 1)
        du, ddelta, dA, dB, dC, dD, ddt_bias, dz, *_ = selective_scan_cuda.bwd(
            conv_out, delta, A, B, C, D, z, dt_bias, dout_z.contiguous(), checkpoints, out, None, True, False)
        dx_dbl = torch.empty_like(x_dbl)
        dx_dbl[:, r:r + n] = dB.squeeze(1).transpose(1, 2).reshape(batch * length, n)
        dx_dbl[:, r + n:] = dC.squeeze(1).transpose(1, 2).reshape(batch * length, n)
        ddelta = ddelta.transpose(0, 1).reshape(e, batch * length).to(x_dbl.dtype)  # (E, batch*L)
        d_dt_proj_w = ddelta @ x_dbl[:, :r]
        dx_dbl[:, :r] = ddelta.t() @ dt_proj_w
        conv_flat = conv_out.transpose(1, 2).reshape(batch * length, e)
        d_x_proj_w = dx_dbl.t() @ conv_flat
        dconv_out = du + (dx_dbl @ x_proj_w).view(batch, length, e).transpose(1, 2)
        dx, dconv_w, dconv_b, _ = causal_conv1d_bwd_function(x, conv_w, conv_b, dconv_out.contiguous(), None, None,
                                                             None, None, False, True)
        return dx, dz, dconv_w, dconv_b, d_x_proj_w, d_dt_proj_w, dA, dD, ddt_bias, None, None, None


def mixer_branch(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, dt_rank: int, d_state: int,
                 recompute: bool = False):
    """x, z: (batch, E, L) with L innermost; conv_w: (E, width); A: (E, N) float32. Returns SiLU(z) * scan(x)."""
    return MixerBranchFn.apply(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, dt_rank, d_state, recompute)
