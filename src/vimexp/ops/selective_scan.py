"""The selective scan of Mamba in plain PyTorch: same arguments and results as mamba-ssm's `selective_scan_fn`.

    delta' = softplus(delta + delta_bias)        (or delta + delta_bias without softplus)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t       h: (batch, E, N), h_{-1} = 0
    y_t    = C_t . h_t + D u_t,   out = y * silu(z)

Everything runs time-major, (L, batch, E, N), so that each step of the recurrence reads one contiguous slice.
The recurrence itself is a loop of in-place multiply-adds over tokens: measured on the 2-core CPU it is 2.2x
faster than a chunked closed form (cumsum of log-decays, exp(+-S); four extra passes and strided cumsums) at 17,
65 and 197 tokens, and it is exact where exp(-S) overflows. Gradients are written out: the adjoint state
lambda_t = C_t g_t + a_{t+1} lambda_{t+1} is the same recurrence run backwards, and every parameter gradient is
a product of lambda, the states and the inputs. States are recomputed in backward rather than kept.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _discretise(u, delta, A, B, delta_bias, delta_softplus, wt):
    """Time-major dt (L, b, E), dt*u (L, b, E), B (L, b, N) and the per-step decay exp(dt A) (L, b, E, N)."""
    dt_raw = delta.to(wt) + (delta_bias.to(wt)[:, None] if delta_bias is not None else 0)
    dt = (F.softplus(dt_raw) if delta_softplus else dt_raw).permute(2, 0, 1)
    dtu = dt * u.to(wt).permute(2, 0, 1)
    Bt = B.to(wt).permute(2, 0, 1)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(wt))
    return dt_raw, dt, dtu, Bt, decay


def _recur(decay: torch.Tensor, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """In place over dim 0: x_t += decay_t x_{t-1} (forward), or x_t += decay_{t+1} x_{t+1} (reverse)."""
    steps = range(x.shape[0] - 2, -1, -1) if reverse else range(1, x.shape[0])
    for t in steps:
        prev = t + 1 if reverse else t - 1
        x[t].addcmul_(decay[max(t, prev)], x[prev])
    return x


def _states(dtu, Bt, decay):
    return _recur(decay, dtu.unsqueeze(-1) * Bt.unsqueeze(2))  # (L, b, E, N)


class SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        wt = torch.float64 if u.dtype == torch.float64 else torch.float32
        _, _, dtu, Bt, decay = _discretise(u, delta, A, B, delta_bias, delta_softplus, wt)
        hs = _states(dtu, Bt, decay)
        y = torch.matmul(hs, C.to(wt).permute(2, 0, 1).unsqueeze(-1)).squeeze(-1).permute(1, 2, 0)  # (b, E, L)
        if D is not None:
            y = y + u.to(wt) * D.to(wt)[:, None]
        out = y * F.silu(z.to(wt)) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y)
        ctx.delta_softplus, ctx.wt = delta_softplus, wt
        return out.to(u.dtype), hs[-1]

    @staticmethod
    @once_differentiable  # hand-written gradients: a second derivative would be silently wrong
    def backward(ctx, grad_out, _grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, y = ctx.saved_tensors
        wt = ctx.wt
        dt_raw, dt, dtu, Bt, decay = _discretise(u, delta, A, B, delta_bias, ctx.delta_softplus, wt)
        hs = _states(dtu, Bt, decay)
        g = grad_out.to(wt)
        gz = None
        if z is not None:
            zw = z.to(wt)
            sig = torch.sigmoid(zw)
            gz = (g * y * sig * (1 + zw * (1 - sig))).to(z.dtype)
            g = g * zw * sig
        gt = g.permute(2, 0, 1)  # (L, b, E)
        lam = _recur(decay, gt.unsqueeze(-1) * C.to(wt).permute(2, 0, 1).unsqueeze(2), reverse=True)
        gC = torch.matmul(gt.unsqueeze(2), hs).squeeze(2)  # (L, b, N): sums over E as matrix products
        gB = torch.matmul(dtu.unsqueeze(2), lam).squeeze(2)
        g_dtu = torch.matmul(lam, Bt.unsqueeze(-1)).squeeze(-1)  # (L, b, E)
        # d loss / d(dt_t A) = lambda_t * decay_t * h_{t-1}, built in the states' buffer
        hs[1:] = hs[:-1] * decay[1:]
        hs[0] = 0
        g_log_a = hs.mul_(lam)
        g_dt = (g_log_a * A.to(wt)).sum(-1) + g_dtu * u.to(wt).permute(2, 0, 1)
        gA = (g_log_a * dt.unsqueeze(-1)).sum((0, 1))
        gu = (g_dtu * dt).permute(1, 2, 0)
        g_dt = g_dt.permute(1, 2, 0)
        gD = None
        if D is not None:
            gu = gu + g * D.to(wt)[:, None]
            gD = (g * u.to(wt)).sum((0, 2)).to(D.dtype)
        if ctx.delta_softplus:
            g_dt = g_dt * torch.where(dt_raw > 20, 1.0, torch.sigmoid(dt_raw))  # F.softplus is linear above 20
        g_bias = g_dt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        return (gu.to(u.dtype), g_dt.to(delta.dtype), gA.to(A.dtype), gB.permute(1, 2, 0).to(B.dtype),
                gC.permute(1, 2, 0).to(C.dtype), gD, gz, g_bias, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """u, delta, z: (batch, E, L); A: (E, N); B, C: (batch, N, L); D, delta_bias: (E,). Returns out (batch, E, L)."""
    out, last_state = SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out
