"""Independent reference tests for the CPU/torch ops (selective scan, causal conv, RMSNorm).

Every reference here is written from the spec (mamba_ssm semantics, see docs/official_impl.md §1.4 and the
public API description), as a naive float64 step-by-step loop, and compared with the vimexp implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vimexp.ops.causal_conv import causal_conv1d_torch
from vimexp.ops.norm import rms_norm_torch
from vimexp.ops.selective_scan import selective_scan_torch


# ----------------------------------------------------------------------------------------------
# naive references (float64, python loops)
# ----------------------------------------------------------------------------------------------


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """h_t = exp(d_t A) h_{t-1} + d_t B_t u_t ; y_t = <C_t, h_t> + D u_t ; out = y * silu(z).

    u, delta, z: (b, E, L); A: (E, N); B, C: (b, N, L); D, delta_bias: (E,). Everything in float64.
    """
    u = u.double()
    delta = delta.double()
    A = A.double()
    B = B.double()
    C = C.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, E, L = u.shape
    N = A.shape[1]
    h = torch.zeros(b, E, N, dtype=torch.float64)
    ys = []
    for t in range(L):
        d_t = delta[:, :, t]  # (b, E)
        dA = torch.exp(d_t[:, :, None] * A[None])  # (b, E, N)
        dBu = d_t[:, :, None] * B[:, None, :, t] * u[:, :, t, None]  # (b, E, N)
        h = dA * h + dBu
        y_t = (h * C[:, None, :, t]).sum(-1)  # (b, E)
        ys.append(y_t)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return (y, h) if return_last_state else y


def naive_causal_conv1d(x, weight, bias=None, activation=None):
    """out[b, e, t] = bias[e] + sum_k weight[e, k] * x[b, e, t - (W - 1) + k], zero for negative indices."""
    x = x.double()
    weight = weight.double()
    b, E, L = x.shape
    W = weight.shape[1]
    out = torch.zeros(b, E, L, dtype=torch.float64)
    for t in range(L):
        acc = torch.zeros(b, E, dtype=torch.float64)
        for k in range(W):
            s = t - (W - 1) + k
            if s >= 0:
                acc = acc + weight[None, :, k] * x[:, :, s]
        if bias is not None:
            acc = acc + bias.double()[None]
        out[:, :, t] = acc
    if activation == "silu":
        out = F.silu(out)
    return out


def naive_rms_norm(x, weight, eps=1e-5, residual=None):
    r = x.double()
    if residual is not None:
        r = r + residual.double()
    ms = (r * r).mean(-1, keepdim=True)
    return r / torch.sqrt(ms + eps) * weight.double(), r


def rel_err(a, b):
    """Norm-relative error ||a - b|| / ||b|| (b is the reference)."""
    a = a.detach().double()
    b = b.detach().double()
    denom = b.norm().item()
    if denom == 0.0:
        return a.norm().item()
    return (a - b).norm().item() / denom


# ----------------------------------------------------------------------------------------------
# input factory
# ----------------------------------------------------------------------------------------------


def make_scan_inputs(batch, E, N, L, *, has_D, has_z, has_bias, softplus, seed=0, big_delta=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, E, L, generator=g, dtype=torch.float64)
    if softplus:
        delta = torch.randn(batch, E, L, generator=g, dtype=torch.float64) * 0.7 - 1.5
    else:
        delta = torch.rand(batch, E, L, generator=g, dtype=torch.float64) * 0.5 + 0.02
    if big_delta:
        delta = torch.rand(batch, E, L, generator=g, dtype=torch.float64) * 45 + 5  # 5..50
    # A ~ -(1..N) with jitter, like S4D-real init, always negative
    A = -(torch.arange(1, N + 1, dtype=torch.float64)[None].repeat(E, 1)
          * torch.exp(torch.randn(E, N, generator=g, dtype=torch.float64) * 0.3))
    B = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    C = torch.randn(batch, N, L, generator=g, dtype=torch.float64)
    D = torch.randn(E, generator=g, dtype=torch.float64) if has_D else None
    z = torch.randn(batch, E, L, generator=g, dtype=torch.float64) if has_z else None
    if has_bias:
        if softplus:
            # inverse softplus of dt in [1e-3, 1e-1], as in the Mamba init
            dt = torch.exp(torch.rand(E, generator=g, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3))
            delta_bias = dt + torch.log(-torch.expm1(-dt))
        else:
            delta_bias = torch.rand(E, generator=g, dtype=torch.float64) * 0.1
    else:
        delta_bias = None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

# (has_D, has_z, has_bias, softplus)
SCAN_CONFIGS = {
    "plain": (False, False, False, False),
    "all": (True, True, True, True),
    "D_softplus": (True, False, False, True),
    "z_bias_nosoftplus": (False, True, True, False),
    "D_z_softplus_nobias": (True, True, False, True),
    "bias_softplus_only": (False, False, True, True),
}

SHAPES = {1: (2, 4, 3), 7: (1, 5, 8), 65: (2, 3, 16), 197: (1, 6, 4)}  # L -> (batch, E, N)


def _run_scan_case(L, cfg_name, dtype, return_last_state, seed):
    batch, E, N = SHAPES[L]
    has_D, has_z, has_bias, softplus = SCAN_CONFIGS[cfg_name]
    inp64 = make_scan_inputs(batch, E, N, L, has_D=has_D, has_z=has_z, has_bias=has_bias,
                             softplus=softplus, seed=seed)
    # cast to the tested dtype; the reference uses exactly the same (rounded) values, in float64
    inp_t = {k: (v.to(dtype).clone().requires_grad_(True) if v is not None else None) for k, v in inp64.items()}
    inp_r = {k: (v.to(dtype).double().clone().requires_grad_(True) if v is not None else None)
             for k, v in inp64.items()}

    res = selective_scan_torch(**inp_t, delta_softplus=softplus, return_last_state=return_last_state)
    ref = naive_selective_scan(**inp_r, delta_softplus=softplus, return_last_state=return_last_state)
    if return_last_state:
        assert isinstance(res, tuple) and len(res) == 2
        out, last = res
        ref_out, ref_last = ref
    else:
        assert isinstance(res, torch.Tensor), "without return_last_state a single tensor must be returned"
        out, ref_out = res, ref
    assert out.shape == (batch, E, L)
    assert out.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    e = rel_err(out, ref_out)
    assert e <= tol, f"output rel err {e:.3e} > {tol:.0e}"
    if return_last_state:
        assert last.shape == (batch, E, N)
        e = rel_err(last, ref_last)
        assert e <= tol, f"last_state rel err {e:.3e} > {tol:.0e}"

    g = torch.Generator().manual_seed(seed + 1000)
    gout = torch.randn(batch, E, L, generator=g, dtype=torch.float64)
    (out * gout.to(dtype)).sum().backward()
    (ref_out * gout.to(dtype).double()).sum().backward()
    gtol = 1e-10 if dtype == torch.float64 else 3e-5
    for name in GRAD_NAMES:
        if inp_t[name] is None:
            continue
        gt = inp_t[name].grad
        gr = inp_r[name].grad
        assert gt is not None, f"no gradient for {name}"
        assert gt.shape == gr.shape
        assert torch.isfinite(gt).all(), f"non-finite gradient for {name}"
        e = rel_err(gt, gr)
        assert e <= gtol, f"grad {name} rel err {e:.3e} > {gtol:.0e}"


@pytest.mark.parametrize("L", [1, 7, 65, 197])
@pytest.mark.parametrize("cfg_name", list(SCAN_CONFIGS))
def test_selective_scan_float64_matches_naive(L, cfg_name):
    _run_scan_case(L, cfg_name, torch.float64, return_last_state=(L % 2 == 1 and cfg_name != "plain"),
                   seed=L * 31 + len(cfg_name))


@pytest.mark.parametrize("L", [1, 7, 65, 197])
@pytest.mark.parametrize("cfg_name", list(SCAN_CONFIGS))
def test_selective_scan_float32_matches_naive(L, cfg_name):
    _run_scan_case(L, cfg_name, torch.float32, return_last_state=(cfg_name in ("all", "plain")),
                   seed=L * 17 + len(cfg_name) + 5)


@pytest.mark.parametrize("return_last_state", [False, True])
def test_selective_scan_return_last_state_both_modes(return_last_state):
    _run_scan_case(65, "all", torch.float64, return_last_state=return_last_state, seed=3)


def test_selective_scan_last_state_matches_continuation():
    """last_state of the first half fed through the second half equals running the full sequence
    (checks the state semantics h_L; exp(dA) decay on the first step of the second half)."""
    inp = make_scan_inputs(2, 4, 5, 20, has_D=False, has_z=False, has_bias=False, softplus=False, seed=11)
    full, last_full = selective_scan_torch(**inp, return_last_state=True)
    ref_full, ref_last = naive_selective_scan(**inp, return_last_state=True)
    assert rel_err(full, ref_full) <= 1e-10
    assert rel_err(last_full, ref_last) <= 1e-10
    half = {k: (v[..., :10] if (v is not None and v.dim() == 3) else v) for k, v in inp.items()}
    _, last_half = selective_scan_torch(**half, return_last_state=True)
    _, ref_last_half = naive_selective_scan(**half, return_last_state=True)
    assert rel_err(last_half, ref_last_half) <= 1e-10


def test_selective_scan_gradcheck():
    inp = make_scan_inputs(2, 3, 4, 6, has_D=True, has_z=True, has_bias=True, softplus=True, seed=7)
    names = GRAD_NAMES
    tensors = tuple(inp[n].clone().requires_grad_(True) for n in names)

    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_selective_scan_gradcheck_no_options():
    inp = make_scan_inputs(1, 2, 3, 5, has_D=False, has_z=False, has_bias=False, softplus=False, seed=8)
    tensors = tuple(inp[n].clone().requires_grad_(True) for n in ["u", "delta", "A", "B", "C"])

    def fn(u, delta, A, B, C):
        return selective_scan_torch(u, delta, A, B, C)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("softplus", [False, True])
def test_selective_scan_large_decay_is_finite_and_correct(dtype, softplus):
    """delta in [5, 50] with A in [-1, -16] over a long sequence: exp(delta*A) underflows to 0 for most
    steps. A cumsum/ratio style implementation would overflow to inf/nan; the scan must stay finite and
    match the naive recurrence."""
    batch, E, N, L = 1, 4, 16, 1024
    inp64 = make_scan_inputs(batch, E, N, L, has_D=True, has_z=True, has_bias=False, softplus=softplus,
                             seed=21, big_delta=True)
    inp64["A"] = -torch.linspace(1, 16, N, dtype=torch.float64)[None].repeat(E, 1)
    inp_t = {k: (v.to(dtype).clone().requires_grad_(True) if v is not None else None) for k, v in inp64.items()}
    inp_r = {k: (v.to(dtype).double().clone().requires_grad_(True) if v is not None else None)
             for k, v in inp64.items()}
    out, last = selective_scan_torch(**inp_t, delta_softplus=softplus, return_last_state=True)
    ref, ref_last = naive_selective_scan(**inp_r, delta_softplus=softplus, return_last_state=True)
    assert torch.isfinite(out).all()
    assert torch.isfinite(last).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(out, ref) <= tol, rel_err(out, ref)
    assert rel_err(last, ref_last) <= tol, rel_err(last, ref_last)
    gout = torch.randn(batch, E, L, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * gout.to(dtype)).sum().backward()
    (ref * gout.to(dtype).double()).sum().backward()
    gtol = 1e-10 if dtype == torch.float64 else 3e-5
    for name in ["u", "delta", "A", "B", "C", "D", "z"]:
        gt = inp_t[name].grad
        assert gt is not None and torch.isfinite(gt).all(), name
        e = rel_err(gt, inp_r[name].grad)
        assert e <= gtol, f"grad {name} rel err {e:.3e}"


def test_selective_scan_large_decay_tiny_delta_mix():
    """Mix of very small and very large steps (delta from 1e-4 to 50) in float32, long L: stays finite."""
    batch, E, N, L = 2, 3, 16, 2000
    g = torch.Generator().manual_seed(99)
    inp = make_scan_inputs(batch, E, N, L, has_D=True, has_z=False, has_bias=False, softplus=False, seed=4)
    delta = torch.exp(torch.rand(batch, E, L, generator=g, dtype=torch.float64)
                      * (math.log(50) - math.log(1e-4)) + math.log(1e-4))
    inp["delta"] = delta
    inp["A"] = -torch.linspace(1, 16, N, dtype=torch.float64)[None].repeat(E, 1)
    inp32 = {k: (v.float() if v is not None else None) for k, v in inp.items()}
    out = selective_scan_torch(**inp32)
    ref = naive_selective_scan(**{k: (v.double() if v is not None else None) for k, v in inp32.items()})
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5


def test_selective_scan_dtype_preserved():
    inp = make_scan_inputs(1, 2, 3, 4, has_D=True, has_z=True, has_bias=True, softplus=True, seed=1)
    inp32 = {k: v.float() for k, v in inp.items()}
    assert selective_scan_torch(**inp32, delta_softplus=True).dtype == torch.float32
    assert selective_scan_torch(**inp, delta_softplus=True).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# causal conv1d
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("L", [1, 3, 10, 33])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_naive(W, L, with_bias, activation):
    g = torch.Generator().manual_seed(W * 100 + L)
    b, E = 2, 5
    x = torch.randn(b, E, L, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, W, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(E, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = causal_conv1d_torch(x, w, bias, activation=activation)
    ref = naive_causal_conv1d(x, w, bias, activation)
    assert out.shape == (b, E, L)
    assert out.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-12
    # gradients through autograd of the naive loop
    gout = torch.randn(b, E, L, generator=g, dtype=torch.float64)
    leaves = [x, w] + ([bias] if with_bias else [])
    g1 = torch.autograd.grad((out * gout).sum(), leaves)
    g2 = torch.autograd.grad((ref * gout).sum(), leaves)
    for a, r in zip(g1, g2):
        assert rel_err(a, r) <= 1e-12
    # float32
    out32 = causal_conv1d_torch(x.detach().float(), w.detach().float(),
                                bias.detach().float() if with_bias else None, activation=activation)
    assert out32.dtype == torch.float32
    ref32 = naive_causal_conv1d(x.detach().float(), w.detach().float(),
                                bias.detach().float() if with_bias else None, activation)
    assert rel_err(out32, ref32) <= 1e-6


def test_causal_conv1d_is_causal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 12, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = causal_conv1d_torch(x, w, None)
    x2 = x.clone()
    x2[..., 7:] += 10.0
    out2 = causal_conv1d_torch(x2, w, None)
    assert torch.equal(out[..., :7], out2[..., :7])
    assert not torch.allclose(out[..., 7:], out2[..., 7:])
    # the last tap multiplies the current input: impulse at t=0 gives w[:, -1], w[:, -2], ... at t=0,1,...
    imp = torch.zeros(1, 3, 6, dtype=torch.float64)
    imp[..., 0] = 1.0
    resp = causal_conv1d_torch(imp, w, None)[0]
    assert torch.allclose(resp[:, :4], w.flip(-1))
    assert torch.all(resp[:, 4:] == 0)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


# The official kernel (mamba_ssm triton layer_norm) loads x / residual and does all the normalisation math in
# float32 whatever the input dtype, so for float64 inputs only float32-level agreement of the *normalised output*
# is required (the residual sum itself must be exact when residual_in_fp32=False and everything is float64).
RMS_F64_TOL = 1e-6


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_float64_matches_naive(with_residual, prenorm, eps):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(24, generator=g, dtype=torch.float64)).requires_grad_(True)
    res = torch.randn(2, 7, 24, generator=g, dtype=torch.float64, requires_grad=True) if with_residual else None
    got = rms_norm_torch(x, w, eps=eps, residual=res, prenorm=prenorm, residual_in_fp32=False)
    ref_out, ref_r = naive_rms_norm(x, w, eps=eps, residual=res)
    if prenorm:
        assert isinstance(got, tuple) and len(got) == 2
        out, r = got
        assert r.dtype == torch.float64
        assert rel_err(r, ref_r) <= 1e-14
    else:
        assert isinstance(got, torch.Tensor)
        out = got
    assert out.shape == x.shape
    assert out.dtype == torch.float64
    e = rel_err(out, ref_out)
    assert e <= RMS_F64_TOL, e
    gout = torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    leaves = [x, w] + ([res] if with_residual else [])
    g1 = torch.autograd.grad((out * gout).sum(), leaves)
    g2 = torch.autograd.grad((ref_out * gout).sum(), leaves)
    for a, r in zip(g1, g2):
        assert rel_err(a, r) <= RMS_F64_TOL


def test_rms_norm_eps_inside_sqrt():
    """eps is added to mean(x^2) inside the sqrt (not to the rms): 1e-3/sqrt(1e-6+1e-5) = 0.3015 (vs 0.990)."""
    x = torch.full((1, 4), 1e-3, dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    out = rms_norm_torch(x, w, eps=1e-5)
    expected = 1e-3 / math.sqrt(1e-6 + 1e-5)
    assert torch.allclose(out, torch.full_like(out, expected), rtol=RMS_F64_TOL, atol=0)


def test_rms_norm_residual_in_fp32_no_residual_bf16():
    """First block in Vim: residual None, residual_in_fp32=True -> returned residual is x in fp32."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 32, generator=g).to(torch.bfloat16)
    w = torch.ones(32, dtype=torch.bfloat16)
    out, r = rms_norm_torch(x, w, eps=1e-5, residual=None, prenorm=True, residual_in_fp32=True)
    assert r.dtype == torch.float32
    assert torch.equal(r, x.float())
    assert out.shape == x.shape
    ref, _ = naive_rms_norm(x, w, eps=1e-5)
    assert rel_err(out.double(), ref) <= 1e-2  # bf16 output rounding


def test_rms_norm_residual_in_fp32_with_fp32_residual_bf16_x():
    """Later Vim blocks: fp32 residual stream + bf16 hidden -> residual returned in fp32, computed in fp32."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 32, generator=g).to(torch.bfloat16)
    res = torch.randn(2, 6, 32, generator=g, dtype=torch.float32)
    w = (1 + 0.1 * torch.randn(32, generator=g)).float()
    out, r = rms_norm_torch(x, w, eps=1e-5, residual=res, prenorm=True, residual_in_fp32=True)
    assert r.dtype == torch.float32
    ref_out, ref_r = naive_rms_norm(x, w, eps=1e-5, residual=res)
    assert rel_err(r, ref_r) <= 1e-6
    assert rel_err(out.double(), ref_out) <= 1e-2


def test_rms_norm_residual_in_fp32_false_keeps_dtype():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 16, generator=g).to(torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    out, r = rms_norm_torch(x, w, eps=1e-5, residual=None, prenorm=True, residual_in_fp32=False)
    assert r.dtype == torch.bfloat16
    assert torch.equal(r, x)
    res = torch.randn(2, 3, 16, generator=g).to(torch.bfloat16)
    out, r = rms_norm_torch(x, w, eps=1e-5, residual=res, prenorm=True, residual_in_fp32=False)
    assert r.dtype == torch.bfloat16
    assert torch.allclose(r.float(), (x.float() + res.float()), atol=2e-2, rtol=1e-2)


def test_rms_norm_fp32_residual_in_fp32_values():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 9, 48, generator=g)
    res = torch.randn(4, 9, 48, generator=g)
    w = 1 + 0.2 * torch.randn(48, generator=g)
    out, r = rms_norm_torch(x, w, eps=1e-5, residual=res, prenorm=True, residual_in_fp32=True)
    ref_out, ref_r = naive_rms_norm(x, w, 1e-5, res)
    assert out.dtype == torch.float32 and r.dtype == torch.float32
    assert rel_err(out, ref_out) <= 1e-6
    assert rel_err(r, ref_r) <= 1e-7
