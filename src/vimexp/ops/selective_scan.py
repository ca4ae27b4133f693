"""The selective scan of Mamba in plain PyTorch: same arguments and results as mamba-ssm's `selective_scan_fn`.

    delta' = softplus(delta + delta_bias)        (or delta + delta_bias without softplus)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t       h: (batch, E, N), h_{-1} = 0
    y_t    = C_t . h_t + D u_t,   out = y * silu(z)

Both the state recurrence (forward) and its adjoint (backward, run in reverse time) are first-order linear
recurrences h_t = a_t h_{t-1} + x_t, solved by `linear_scan` in chunks: inside a chunk of T steps, with
S_t = sum_{s<=t} log a_s,   h_t = exp(S_t) h_start + exp(S_t) sum_{s<=t} exp(-S_s) x_s,
so the Python loop runs over chunks, not tokens. The gradients are written out (autograd through exp(+-S) would
cancel catastrophically in float32): dA, d(delta) come from sum_t lambda_t h_{t-1} a_t, with lambda the adjoint state.
"""
import torch
import torch.nn.functional as F

MAX_CHUNK = 64
# exp(LIMIT) stays far inside the dtype's range; a one-step decay below exp(-LIMIT) is below its resolution anyway
LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def linear_scan(log_a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) * h_{t-1} + x_t, h_{-1} = 0, over dim 2 of (batch, E, L, N) tensors."""
    seqlen, limit = x.shape[2], LIMIT[x.dtype]
    step = (-log_a).amax().item()  # the largest one-step log-decay sets the chunk length: |S| <= limit
    T = int(max(1, min(MAX_CHUNK, seqlen, limit // max(step, 1e-30))))
    if T == 1:
        log_a = log_a.clamp(min=-limit)
    out = torch.empty_like(x)
    h = None
    for s in range(0, seqlen, T):
        c = slice(s, min(s + T, seqlen))
        S = log_a[:, :, c].cumsum(2)
        growth = torch.exp(S)
        chunk = growth * (x[:, :, c] / growth).cumsum(2)
        if h is not None:  # the carried state, added separately so that it keeps its own precision
            chunk += growth * h.unsqueeze(2)
        out[:, :, c] = chunk
        h = chunk[:, :, -1]
    return out


def _prepare(u, delta, A, B, delta_bias, delta_softplus, wt):
    dt_raw = delta.to(wt) + (delta_bias.to(wt)[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt_raw) if delta_softplus else dt_raw
    Bt = B.to(wt).transpose(1, 2)  # (batch, L, N)
    log_a = dt.unsqueeze(-1) * A.to(wt)[:, None, :]  # (batch, E, L, N)
    x = (dt * u.to(wt)).unsqueeze(-1) * Bt.unsqueeze(1)
    return dt_raw, dt, Bt, log_a, x


class SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        wt = torch.float64 if u.dtype == torch.float64 else torch.float32
        _, _, _, log_a, x = _prepare(u, delta, A, B, delta_bias, delta_softplus, wt)
        hs = linear_scan(log_a, x)
        y = (hs * C.to(wt).transpose(1, 2).unsqueeze(1)).sum(-1)
        if D is not None:
            y = y + u.to(wt) * D.to(wt)[:, None]
        out = y * F.silu(z.to(wt)) if z is not None else y
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, y)
        ctx.delta_softplus, ctx.wt = delta_softplus, wt
        return out.to(u.dtype), hs[:, :, -1]

    @staticmethod
    def backward(ctx, grad_out, _grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, y = ctx.saved_tensors
        wt = ctx.wt
        dt_raw, dt, Bt, log_a, x = _prepare(u, delta, A, B, delta_bias, ctx.delta_softplus, wt)
        hs = linear_scan(log_a, x)  # recomputed: cheaper than keeping (batch, E, L, N) states alive
        g = grad_out.to(wt)
        gz = None
        if z is not None:
            zw = z.to(wt)
            sig = torch.sigmoid(zw)
            gz = (g * y * sig * (1 + zw * (1 - sig))).to(z.dtype)
            g = g * zw * sig
        uw, Ct = u.to(wt), C.to(wt).transpose(1, 2)
        # adjoint: lambda_t = C_t g_t + a_{t+1} lambda_{t+1}, a forward scan in reversed time
        log_a_next = F.pad(log_a[:, :, 1:], (0, 0, 0, 1))
        lam = linear_scan(log_a_next.flip(2), (g.unsqueeze(-1) * Ct.unsqueeze(1)).flip(2)).flip(2)
        # products and sums rather than einsum: its permutations copy the (batch, E, L, N) tensors
        gC = (hs * g.unsqueeze(-1)).sum(1).transpose(1, 2)
        gB = (lam * (dt * uw).unsqueeze(-1)).sum(1).transpose(1, 2)
        g_dtu = (lam * Bt.unsqueeze(1)).sum(-1)
        h_prev = F.pad(hs[:, :, :-1], (0, 0, 1, 0))
        g_log_a = lam * h_prev * torch.exp(log_a)  # d loss / d (delta' A) at each (t, n)
        g_dt = (g_log_a * A.to(wt).unsqueeze(1)).sum(-1) + g_dtu * uw
        gA = (g_log_a * dt.unsqueeze(-1)).sum((0, 2))
        gu = g_dtu * dt
        gD = None
        if D is not None:
            gu = gu + g * D.to(wt)[:, None]
            gD = (g * uw).sum((0, 2)).to(D.dtype)
        if ctx.delta_softplus:
            g_dt = g_dt * torch.where(dt_raw > 20, 1.0, torch.sigmoid(dt_raw))  # F.softplus is linear above 20
        g_bias = g_dt.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
        return (gu.to(u.dtype), g_dt.to(delta.dtype), gA.to(A.dtype), gB.to(B.dtype), gC.to(C.dtype), gD, gz,
                g_bias, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """u, delta, z: (batch, E, L); A: (E, N); B, C: (batch, N, L); D, delta_bias: (E,). Returns out (batch, E, L)."""
    out, last_state = SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out
