"""(Add +) RMSNorm in plain PyTorch: the arguments and results of mamba-ssm's Triton `rms_norm_fn`, and x_scale
(drop path's factors, which the fused path's norm applies in its kernel)."""
import torch


def scaled(x, x_scale):
    """x times one factor a sample (x's first axis), in x's dtype: drop path's multiply."""
    return x if x_scale is None else x * x_scale.view(-1, *(1,) * (x.dim() - 1))


def rms_norm_torch(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                   x_scale=None):
    """out = RMSNorm(x x_scale + residual); with prenorm also returns the sum (kept in fp32 if residual_in_fp32)."""
    x = scaled(x, x_scale)
    if residual is not None:
        x_sum = x.to(residual.dtype) + residual
    else:
        x_sum = x.float() if residual_in_fp32 else x
    xf = x_sum.float()
    out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        out = out + bias.float()
    out = out.to(x.dtype)
    return (out, x_sum) if prenorm else out
