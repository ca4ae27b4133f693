"""(Add +) RMSNorm in plain PyTorch: same arguments and results as mamba-ssm's Triton `rms_norm_fn`."""
import torch


def rms_norm_torch(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """out = RMSNorm(x + residual); with prenorm also returns the sum (kept in fp32 if residual_in_fp32)."""
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
