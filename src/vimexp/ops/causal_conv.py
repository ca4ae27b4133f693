"""Depthwise causal Conv1d in plain PyTorch: same arguments and results as causal-conv1d's `causal_conv1d_fn`."""
import torch.nn.functional as F


def causal_conv1d_torch(x, weight, bias=None, activation=None):
    """x: (batch, E, L); weight: (E, W); output t sees inputs t-W+1..t (zero-padded on the left)."""
    width = weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out
