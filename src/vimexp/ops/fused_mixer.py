"""The bidirectional Vim mixer (bimamba v2) between in_proj and out_proj, fused in Triton: `kernel="fused"`.

    xz -> x, z;  for each direction d: xc_d = SiLU(conv_d(x)) (causal for d=0, its mirror image for d=1),
    x_dbl_d = x_proj_d(xc_d) -> dt, B, C;  y_d = scan_d(xc_d, softplus(dt_proj_d(dt) + bias_d), A_d, B, C) + D_d xc_d
    out = SiLU(z) * (y_0 + y_1)                                       (the halving stays on out_proj's weight)

Nothing is ever flipped: the backward direction reads its tokens from the end and its conv is the mirror-image
(anti-causal) filter. The projections between the kernels are plain GEMMs in whichever layout the kernels use.

Everything runs channel-last, (batch*L, channels): `bimixer_channel_last` and its custom ops
(`vimexp::bimixer_scan`, `vimexp::bimixer_scan_backward`, which torch.compile and torch.export see as single nodes;
eager calls skip torch's op dispatch, vimexp.ops.custom_ops), in inference and training:
- `_conv_fwd`: both convs + SiLU from one read of x;
- `_scan_seq`: a program owns a block of channels of one direction and a chunk of tokens, keeps the (channels x N)
  states in registers and steps through its tokens one at a time, loading the next token's inputs before this one's
  arithmetic. Long sequences run in two passes (chunk end states, then the outputs from the carried-in state),
  or in one where the batch alone fills the GPU (SEQ_LONG's ONE_PASS); each direction writes SiLU(z) y_d beside
  the other, and out_proj adds the two in its GEMM;
- where no gradient is taken, on a GPU, at 16 states, the scan is vimexp.ops.scan_one_pass instead (Gluon: each
  channel's states over 4 lanes, one pass over any length; `vimexp::bimixer_scan_inference`), which keeps nothing
  for a backward;
- `_scan_seq_bwd`: the same programs backwards in time: the chunk's states recomputed, every other one kept in a
  scratch buffer, then the adjoint walked back two steps at a time, carried between chunks as the states are (a
  first pass of chunk aggregates);
- `_conv_bwd_dpre` / `_conv_bwd_dx`: the conv's backward (its output is kept from the forward, its
  pre-activation recomputed).
The GEMMs between them (x_proj, dt_proj) get dimensions padded to 16 bytes (`pack_params`).
Every kernel computes in float32 whatever the activation dtype. What each design gained, and what it was predicted
to: docs/optimisation.md (H200, bf16, 224 px batch 128 training steps as CUDA graphs: Vim-S 2.85x and
Vim-Ti 2.65x the mamba-ssm path; Vim-Ti inference as CUDA graphs at 1248 px 2.05x at batch 8, 2.88x at batch 64).
The first training design, associative scans over channel-major tiles, ran at 0.4x and was deleted after 603f838;
docs/optimisation.md keeps its measurements.

Block sizes: every launch takes a `Blocks` (`blocks=`), by default the tuned one (`tuned()`: the tables SEQ, SEQ_LONG,
SEQ_BWD, CONV_BLOCK, CONV_DPRE, LANES). A sweep passes its own (`with_blocks(seq_bwd=dict(BD=32))`, as
`python -m vimexp.bench bench=mixer bench.sweep=true` does) instead of writing into the tuned tables.
"""
import json
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vimexp.ops.custom_ops import eager_fast


@triton.jit
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(y), y = e^-|x| in (0, 1], to float32 accuracy (1.9e-7) for any x: one
    exponential and a polynomial, where log(1 + e^x) costs a software logarithm (about 20 instructions) and a
    division, and loses y's digits below x = -12. q(y) = log1p(y) / y is a degree-8 fit at Chebyshev nodes on [0, 1]
    (Horner in float32)."""
    y = tl.exp2(tl.abs(x) * -1.4426950408889634)
    q = 0.005253458 * y - 0.029588507
    q = q * y + 0.07836167
    q = q * y - 0.1367477
    q = q * y + 0.1911143
    q = q * y - 0.2484437
    q = q * y + 0.3331927
    q = q * y - 0.49999502
    q = q * y + 1.0
    return tl.maximum(x, 0.0) + y * q


# ----------------------------------------------------------------------------------------------------- conv
@triton.jit
def _tap(t, k, d: tl.constexpr, K: tl.constexpr):
    """The token that tap k of direction d's conv reads for output token t: causal (d=0) or mirrored (d=1)."""
    if d == 0:
        return t - (K - 1) + k
    else:
        return t + (K - 1) - k


@triton.jit
def _conv_pre(X, W, CB, e, e_ok, b, t, L, SE, ST, E, d: tl.constexpr, K: tl.constexpr, BE: tl.constexpr,
              BT: tl.constexpr):
    """Pre-activation of direction d's depthwise conv at tokens t: causal (d=0) or its mirror image (d=1).
    x[e, token] sits at X + e*SE + token*ST (channel-last inside xz: SE = 1, ST = 2E)."""
    acc = tl.zeros([BE, BT], tl.float32) + tl.load(CB + d * E + e, mask=e_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        src = _tap(t, k, d, K)
        ok = e_ok[:, None] & ((src >= 0) & (src < L))[None, :]
        xv = tl.load(X + e[:, None] * SE + (b * L + src[None, :]) * ST, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(W + (d * E + e) * K + k, mask=e_ok, other=0.0).to(tl.float32)[:, None] * xv
    return acc


@triton.jit
def _conv_fwd(X, W, CB, XC, L, SE, ST, OD, OE, OT, E, K: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    """SiLU(conv_d(x)) of both directions into XC + d*OD + e*OE + token*OT."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    b = tl.program_id(1)
    e = tl.program_id(2) * BE + tl.arange(0, BE)
    e_ok = e < E
    ok = e_ok[:, None] & (t < L)[None, :]
    for d in tl.static_range(2):
        pre = _conv_pre(X, W, CB, e, e_ok, b, t, L, SE, ST, E, d, K, BE, BT)
        tl.store(XC + d * OD + e[:, None] * OE + (b * L + t[None, :]) * OT, pre * tl.sigmoid(pre), mask=ok)


@triton.jit
def _conv_bwd_dpre(X, W, CB, DXC, DPRE, DW, DCB, L, SE, ST, OD, OE, OT, E, K: tl.constexpr, KP: tl.constexpr,
                   BE: tl.constexpr, BT: tl.constexpr, SEG: tl.constexpr):
    """d(pre-activation) of both convs, and their weight and bias gradients. x as in _conv_pre; d(output) and d(pre)
    at DXC/DPRE + d*OD + e*OE + token*OT. A program covers SEG tokens of one sequence in tiles of BT and keeps the
    gradients' products elementwise in registers: it reduces them and adds them to DW and DCB once at its end, not
    once a tile."""
    seg = tl.program_id(0) * SEG
    b = tl.program_id(1)
    e = tl.program_id(2) * BE + tl.arange(0, BE)
    e_ok = e < E
    kk = tl.arange(0, KP)
    end = tl.minimum(L, seg + SEG)
    for d in tl.static_range(2):
        dw = tl.zeros([KP, BE, BT], tl.float32)
        db = tl.zeros([BE, BT], tl.float32)
        for t0 in range(seg, end, BT):
            t = t0 + tl.arange(0, BT)
            ok = e_ok[:, None] & (t < end)[None, :]
            pre = _conv_pre(X, W, CB, e, e_ok, b, t, L, SE, ST, E, d, K, BE, BT)
            sig = tl.sigmoid(pre)
            off = d * OD + e[:, None] * OE + (b * L + t[None, :]) * OT
            dpre = tl.load(DXC + off, mask=ok, other=0.0).to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))
            dpre = tl.where(ok, dpre, 0.0)
            tl.store(DPRE + off, dpre, mask=ok)
            db += dpre
            src = _tap(t[None, None, :], kk[:, None, None], d, K)  # (KP, 1, BT): the token each tap read
            xok = (kk < K)[:, None, None] & e_ok[None, :, None] & ((src >= 0) & (src < L))
            xv = tl.load(X + e[None, :, None] * SE + (b * L + src) * ST, mask=xok, other=0.0)
            dw += dpre[None, :, :] * xv.to(tl.float32)
        tl.atomic_add(DCB + d * E + e, tl.sum(db, axis=1), mask=e_ok, sem="relaxed")
        tl.atomic_add(DW + (d * E + e[None, :]) * K + kk[:, None], tl.sum(dw, axis=2),
                      mask=(kk < K)[:, None] & e_ok[None, :], sem="relaxed")


@triton.jit
def _conv_bwd_dx(W, DPRE, DZ, DX, L, OD, OE, OT, SE, ST, E, K: tl.constexpr, BE: tl.constexpr, BT: tl.constexpr):
    """dx at DX + e*SE + token*ST from both convs' d(pre) (strides OD, OE, OT), and dz at DX + E*SE + ...: the sum
    of both directions' DZ (strides as d(pre)'s). Summed here, not by torch.add into the strided half of dxz, which
    ran an unvectorised 30 us kernel a Vim-Ti layer (H200)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    b = tl.program_id(1)
    e = tl.program_id(2) * BE + tl.arange(0, BE)
    e_ok = e < E
    acc = tl.zeros([BE, BT], tl.float32)
    for d in tl.static_range(2):
        for k in tl.static_range(K):
            dst = _tap(t, k, 1 - d, K)  # the output token whose tap k read x_t: the other direction's tap
            ok = e_ok[:, None] & ((dst >= 0) & (dst < L))[None, :]
            dp = tl.load(DPRE + d * OD + e[:, None] * OE + (b * L + dst[None, :]) * OT, mask=ok, other=0.0)
            acc += tl.load(W + (d * E + e) * K + k, mask=e_ok, other=0.0).to(tl.float32)[:, None] * dp
    ok = e_ok[:, None] & (t < L)[None, :]
    tl.store(DX + e[:, None] * SE + (b * L + t[None, :]) * ST, acc, mask=ok)
    dz = DZ + e[:, None] * OE + (b * L + t[None, :]) * OT
    dz = tl.load(dz, mask=ok, other=0.0).to(tl.float32) + tl.load(dz + OD, mask=ok, other=0.0).to(tl.float32)
    tl.store(DX + (E + e[:, None]) * SE + (b * L + t[None, :]) * ST, dz, mask=ok)


# ----------------------------------------------------------------------------------------------------- scan
@triton.jit
def _seq_params(AT, D, DTB, d, e, e_ok, E, N: tl.constexpr):
    """Offsets and values of direction d's A (N, BD), from the transposed (2, N, E) stack, and its D and dt bias."""
    a_off = (d * N + tl.arange(0, N)[:, None]) * E + e[None, :]
    return (a_off, tl.load(AT + a_off, mask=e_ok[None, :], other=0.0), tl.load(D + d * E + e, mask=e_ok, other=0.0),
            tl.load(DTB + d * E + e, mask=e_ok, other=0.0))


@triton.jit
def _state_entering(HC, SC, A2, d, b, c, e, e_ok, B, E, NC, N: tl.constexpr, BD: tl.constexpr):
    """The (N, BD) state entering chunk c: PASS 0's end states of the chunks before it in scan order, each carried
    through the decays (summed deltas) of the chunks after it."""
    n = tl.arange(0, N)
    h = tl.zeros([N, BD], tl.float32)
    for cp in range(c):
        base = ((d * B + b) * NC + cp) * E
        decay = tl.exp2(tl.load(SC + base + e, mask=e_ok, other=0.0)[None, :] * A2)
        h = decay * h + tl.load(HC + base * N + n[:, None] * E + e[None, :], mask=e_ok[None, :], other=0.0)
    return h


@triton.jit
def _scan_seq(U, BC, DT, Z, AT, D, DTB, Y2, HC, SC, L, B, E, NC, CL, N: tl.constexpr, BD: tl.constexpr,
              PASS: tl.constexpr):
    """Channel-last, one step at a time: a program owns (channel block, batch, chunk of CL steps, direction) and
    keeps its (N, BD) states in registers. PASS 0 writes each chunk's end state from a zero start and its summed
    delta; PASS 1 carries the state in from the chunks before, then writes SiLU(z) y_d to Y2 (batch*L, 2, E).
    The next step's inputs are loaded before this step's arithmetic, so their latency hides behind it.
    Every 2-D tensor is (N, BD) and every 2-D load runs along the channels (AT is A transposed, (2, N, E)), so
    Triton lays the channels across the lanes and a lane owns all N states of its channels: the sum over states
    stays in the lane. Laid out (BD, N), Triton spread the states over lanes instead: 64 shuffles, a shared-memory
    round trip and three barriers at every step."""
    e = tl.program_id(0) * BD + tl.arange(0, BD)
    b = tl.program_id(1) // NC
    c = tl.program_id(1) % NC
    d = tl.program_id(2)
    e_ok = e < E
    n = tl.arange(0, N)
    BL = B * L
    _, A_, Dd, bias = _seq_params(AT, D, DTB, d, e, e_ok, E, N)
    A2 = A_ * 1.4426950408889634  # exp(x A) = exp2(x A log2(e))
    if PASS == 1:
        h = _state_entering(HC, SC, A2, d, b, c, e, e_ok, B, E, NC, N, BD)
    else:
        h = tl.zeros([N, BD], tl.float32)
    sgn = 1 - 2 * d
    steps = tl.minimum(CL, L - c * CL)
    row = b * L + d * (L - 1) + sgn * c * CL  # the first token of the chunk in scan order
    u_next = tl.load(U + (d * BL + row) * E + e, mask=e_ok, other=0.0)
    dt_next = tl.load(DT + (d * BL + row) * E + e, mask=e_ok, other=0.0)
    B_next = tl.load(BC + (d * BL + row) * 2 * N + n)
    C_next = tl.load(BC + (d * BL + row) * 2 * N + N + n)
    z_next = tl.load(Z + row * 2 * E + e, mask=e_ok, other=0.0)
    sum_delta = tl.zeros([BD], tl.float32)
    for i in tl.range(steps, loop_unroll_factor=2):  # unrolled: no register moves for the prefetched inputs
        u, dt, Bv, Cv, z = u_next.to(tl.float32), dt_next, B_next, C_next, z_next
        out_row = row
        row += tl.where(i + 1 < steps, sgn, 0)  # the last step reloads its own row: unmasked loads stay in bounds
        u_next = tl.load(U + (d * BL + row) * E + e, mask=e_ok, other=0.0)
        dt_next = tl.load(DT + (d * BL + row) * E + e, mask=e_ok, other=0.0)
        B_next = tl.load(BC + (d * BL + row) * 2 * N + n)
        if PASS == 1:
            C_next = tl.load(BC + (d * BL + row) * 2 * N + N + n)
            z_next = tl.load(Z + row * 2 * E + e, mask=e_ok, other=0.0)
        delta = _softplus(dt.to(tl.float32) + bias)
        h = tl.exp2(delta[None, :] * A2) * h + Bv[:, None] * (delta * u)[None, :]
        if PASS == 0:
            sum_delta += delta
        else:
            y = tl.sum(h * Cv[:, None], axis=0) + Dd * u
            z = z.to(tl.float32)
            tl.store(Y2 + out_row * 2 * E + d * E + e, y * z * tl.sigmoid(z), mask=e_ok)
    if PASS == 0:
        base = ((d * B + b) * NC + c) * E
        tl.store(SC + base + e, sum_delta, mask=e_ok)
        tl.store(HC + base * N + n[:, None] * E + e[None, :], h, mask=e_ok[None, :])


@triton.jit
def _step_inputs(U, BC, DT, Z, DY2, row, d, BL, E, e, e_ok, n, N: tl.constexpr, bias):
    """One step's inputs to the backward: u, the raw and softplus'd delta, B, C, and dy = d(y_d) (through the gate)."""
    u = tl.load(U + (d * BL + row) * E + e, mask=e_ok, other=0.0).to(tl.float32)
    dt_raw = tl.load(DT + (d * BL + row) * E + e, mask=e_ok, other=0.0).to(tl.float32) + bias
    Bv = tl.load(BC + (d * BL + row) * 2 * N + n)
    Cv = tl.load(BC + (d * BL + row) * 2 * N + N + n)
    z = tl.load(Z + row * 2 * E + e, mask=e_ok, other=0.0).to(tl.float32)
    dy2 = tl.load(DY2 + row * 2 * E + d * E + e, mask=e_ok, other=0.0).to(tl.float32)
    return u, dt_raw, _softplus(dt_raw), Bv, Cv, dy2 * z * tl.sigmoid(z)


@triton.jit
def _adjoint_step(DU, DDT, DBC, row, d, BL, E, e, e_ok, n, N: tl.constexpr, A2, Dd, u, dt_raw, delta, Bv, Cv, dy,
                  gp, h, dA_acc, dbias_acc, AFTER: tl.constexpr = False):
    """Step t of the walk back: g_t = C_t dy_t + gp (what step t+1 handed back), then du, d(dt), dB at t, dA and
    d(bias) summed; returns what step t hands to t-1, gp = decay_t g_t. h is the state before step t, or with AFTER
    the state after it: decay_t h_{t-1} = h_t - B_t delta_t u_t."""
    g = Cv[:, None] * dy[None, :] + gp
    gp = tl.exp2(delta[None, :] * A2) * g
    if AFTER:
        dh_dlog = g * (h - Bv[:, None] * (delta * u)[None, :])  # d loss / d(delta A) at this step
    else:
        dh_dlog = gp * h
    gB = tl.sum(g * Bv[:, None], axis=0)
    ddelta = tl.sum(dh_dlog * A2, axis=0) * 0.6931471805599453 + gB * u  # A = A2 ln 2: A itself not kept live
    dA_acc += dh_dlog * delta[None, :]
    tl.store(DU + (d * BL + row) * E + e, gB * delta + Dd * dy, mask=e_ok)
    ddt = tl.where(e_ok, ddelta * tl.where(dt_raw > 20.0, 1.0, tl.sigmoid(dt_raw)), 0.0)
    tl.store(DDT + (d * BL + row) * E + e, ddt, mask=e_ok)
    tl.atomic_add(DBC + (d * BL + row) * 2 * N + n, tl.sum(g * (delta * u)[None, :], axis=1), sem="relaxed")
    return gp, dA_acc, dbias_acc + ddt


@triton.jit
def _scan_seq_bwd(U, BC, DT, Z, AT, D, DTB, DY2, HC, SC, GQ, HS, HIN, DU, DDT, DBC, DZ, DAT, DD, DDTB, L, B, E, NC, CL,
                  N: tl.constexpr, BD: tl.constexpr, PASS: tl.constexpr):
    """Backward of _scan_seq, same programs and (N, BD) layout. The adjoint g_t = C_t dy_t + decay_{t+1} g_{t+1}
    runs backwards in time and is carried between chunks as the states are: PASS 0 (several chunks only) writes
    each chunk's outgoing adjoint decay_first * g_first from a zero start; PASS 1 recomputes the chunk's states and
    keeps every other one (after its odd steps) in the HS scratch (2, batch, L // 2, N, E), the state entering it in
    HIN (2, batch, NC, N, E), and as it goes writes dz and dC and sums dD; then it walks back through the chunk in
    pairs of steps with the adjoint carried in from the chunks after it, writing du, d(dt), dB and summing dA
    (transposed, like AT) and d(bias). A pair (2p, 2p + 1) reads the state kept before it and recomputes the one
    between from it: half the scratch traffic of keeping every state, for an exponential and an FMA a state and
    pair. HS is read 4 channels a vector, so Triton lays each (N, BD) tile as 2 x 16 lanes: a lane holds 4 channels
    and 8 states, and the per-channel work repeats on 2 lanes rather than on 4 (16-byte vectors: 4 x 8)."""
    e = tl.program_id(0) * BD + tl.arange(0, BD)
    b = tl.program_id(1) // NC
    c = tl.program_id(1) % NC
    d = tl.program_id(2)
    e_ok = e < E
    n = tl.arange(0, N)
    BL = B * L
    a_off, A_, Dd, bias = _seq_params(AT, D, DTB, d, e, e_ok, E, N)
    A2 = A_ * 1.4426950408889634
    sgn = 1 - 2 * d
    steps = tl.minimum(CL, L - c * CL)
    first = b * L + d * (L - 1) + sgn * c * CL  # the chunk's first token in scan order
    # the state after the chunk's odd step i (but its last) sits at (d, b, c (CL // 2) + i // 2)
    hs_ptr = HS + tl.max_contiguous((((d * B + b) * (L // 2) + c * (CL // 2)) * N + n[:, None]) * E + e[None, :],
                                    [1, 4])  # + (i // 2) * N * E
    if PASS == 1:
        h = _state_entering(HC, SC, A2, d, b, c, e, e_ok, B, E, NC, N, BD)  # then the chunk's states
        hin_ptr = HIN + (((d * B + b) * NC + c) * N + n[:, None]) * E + e[None, :]
        tl.store(hin_ptr, h, mask=e_ok[None, :] & (c > 0))
        dD_acc = tl.zeros([BD], tl.float32)
        for i in tl.range(0, steps, num_stages=3):
            row = first + sgn * i
            u = tl.load(U + (d * BL + row) * E + e, mask=e_ok, other=0.0).to(tl.float32)
            delta = _softplus(tl.load(DT + (d * BL + row) * E + e, mask=e_ok, other=0.0).to(tl.float32) + bias)
            Bv = tl.load(BC + (d * BL + row) * 2 * N + n)
            Cv = tl.load(BC + (d * BL + row) * 2 * N + N + n)
            z = tl.load(Z + row * 2 * E + e, mask=e_ok, other=0.0).to(tl.float32)
            zsig = tl.sigmoid(z)
            dy2 = tl.load(DY2 + row * 2 * E + d * E + e, mask=e_ok, other=0.0).to(tl.float32)
            dy = dy2 * z * zsig
            h = tl.exp2(delta[None, :] * A2) * h + Bv[:, None] * (delta * u)[None, :]
            tl.store(hs_ptr + (i // 2) * N * E, h, mask=e_ok[None, :] & (i % 2 == 1) & (i + 1 < steps))
            # What needs the state and not the adjoint (dz through y, dC, dD) is done here, from the float32 state,
            # not in the walk from the stored one: the walk then carries one tile fewer.
            y = tl.sum(h * Cv[:, None], axis=0) + Dd * u
            tl.store(DZ + (d * BL + row) * E + e, dy2 * y * zsig * (1.0 + z * (1.0 - zsig)), mask=e_ok)
            tl.atomic_add(DBC + (d * BL + row) * 2 * N + N + n, tl.sum(h * dy[None, :], axis=1), sem="relaxed")
            dD_acc += dy * u
        tl.debug_barrier()
        gp = tl.zeros([N, BD], tl.float32)  # the adjoint arriving from the chunks after this one
        for k in range(NC - 1, c, -1):
            base = ((d * B + b) * NC + k) * E
            decay = tl.exp2(tl.load(SC + base + e, mask=e_ok, other=0.0)[None, :] * A2)
            gp = tl.load(GQ + base * N + n[:, None] * E + e[None, :], mask=e_ok[None, :], other=0.0) + decay * gp
        # The walk carries gp = decay_t g_t, what step t hands to step t-1: g_t = C_t dy_t + gp_{t+1}. Carrying g and
        # the next step's decay instead would hold one more (N, BD) tile live and cost one more multiply a state.
        dA_acc = tl.zeros([N, BD], tl.float32)
        dbias_acc = tl.zeros([BD], tl.float32)
        if steps % 2 == 1:  # an odd chunk's last step (even) alone first: the state before it was kept
            i = steps - 1
            row = first + sgn * i
            if i > 0:
                h_prev = tl.load(hs_ptr + ((i - 1) // 2) * N * E, mask=e_ok[None, :], other=0.0).to(tl.float32)
            else:
                h_prev = tl.load(hin_ptr, mask=e_ok[None, :] & (c > 0), other=0.0)
            u, dt_raw, delta, Bv, Cv, dy = _step_inputs(U, BC, DT, Z, DY2, row, d, BL, E, e, e_ok, n, N, bias)
            gp, dA_acc, dbias_acc = _adjoint_step(DU, DDT, DBC, row, d, BL, E, e, e_ok, n, N, A2, Dd, u, dt_raw,
                                                  delta, Bv, Cv, dy, gp, h_prev, dA_acc, dbias_acc)
        # The pair's first step takes its decayed state from h1 (AFTER) rather than h0, so h0 is dead once h1 is
        # formed: a tile fewer live through the pair, fewer spills under the register cap (WAVE_MAXNREG below):
        # 2.5% faster a capped Vim-Ti training step, the same uncapped (H200).
        for j in tl.range(0, steps // 2, num_stages=1):  # 1: 1.7% faster than 2, 13% than 3 (H200)
            p = steps // 2 - 1 - j
            row0 = first + sgn * 2 * p
            if p > 0:
                h0 = tl.load(hs_ptr + (p - 1) * N * E, mask=e_ok[None, :], other=0.0).to(tl.float32)
            else:
                h0 = tl.load(hin_ptr, mask=e_ok[None, :] & (c > 0), other=0.0)
            u, dt_raw, delta, Bv, Cv, dy = _step_inputs(U, BC, DT, Z, DY2, row0 + sgn, d, BL, E, e, e_ok, n, N, bias)
            u0, dt_raw0, delta0, Bv0, Cv0, dy0 = _step_inputs(U, BC, DT, Z, DY2, row0, d, BL, E, e, e_ok, n, N, bias)
            h1 = tl.exp2(delta0[None, :] * A2) * h0 + Bv0[:, None] * (delta0 * u0)[None, :]  # the state between
            gp, dA_acc, dbias_acc = _adjoint_step(DU, DDT, DBC, row0 + sgn, d, BL, E, e, e_ok, n, N, A2, Dd, u,
                                                  dt_raw, delta, Bv, Cv, dy, gp, h1, dA_acc, dbias_acc)
            gp, dA_acc, dbias_acc = _adjoint_step(DU, DDT, DBC, row0, d, BL, E, e, e_ok, n, N, A2, Dd, u0, dt_raw0,
                                                  delta0, Bv0, Cv0, dy0, gp, h1, dA_acc, dbias_acc, AFTER=True)
        tl.atomic_add(DAT + a_off, dA_acc, mask=e_ok[None, :], sem="relaxed")
        tl.atomic_add(DD + d * E + e, dD_acc, mask=e_ok, sem="relaxed")
        tl.atomic_add(DDTB + d * E + e, dbias_acc, mask=e_ok, sem="relaxed")
    else:  # what this chunk sends to the one before it: decay at its first step times g there
        gp = tl.zeros([N, BD], tl.float32)
        for j in tl.range(0, steps, num_stages=3):
            row = first + sgn * (steps - 1 - j)
            u, dt_raw, delta, Bv, Cv, dy = _step_inputs(U, BC, DT, Z, DY2, row, d, BL, E, e, e_ok, n, N, bias)
            gp = tl.exp2(delta[None, :] * A2) * (Cv[:, None] * dy[None, :] + gp)
        base = ((d * B + b) * NC + c) * E
        tl.store(GQ + base * N + n[:, None] * E + e[None, :], gp, mask=e_ok[None, :])


# ------------------------------------------------------------------------------------------------------ blocks
# Blocks of the channel-last kernels, by H100 and H200 sweeps (python -m vimexp.bench bench=mixer bench.sweep=true):
# channels a program, tokens a chunk. The tuned values: read them, pass a Blocks to try others (with_blocks).
SEQ = dict(BD=64, CL=256, num_warps=1)  # sequences of one chunk
# Longer ones: two passes over chunks (more, smaller programs ran 8% faster), or one pass over the whole sequence
# where the batch alone gives ONE_PASS programs (batch x 2 directions x channel blocks): at 1024 px (4,097 tokens)
# and 1248 px (6,085), 1,536 programs ran one pass 1.25x faster than two, 768 ran it 1.36x slower (H200 sweep).
SEQ_LONG = dict(BD=32, CL=256, num_warps=1, ONE_PASS=1024)
SEQ_BWD = dict(BD=64, num_warps=1, WAVE_MAXNREG=168)  # _scan_seq_bwd (chunks as the forward's): 64 channels on one
# warp ran 8-33% faster than 32 (H200 sweeps). It uses all 255 registers, 8 programs an SM. Where its grid needs more
# than one wave of those but fits one at WAVE_MAXNREG (12 an SM), it launches capped there (an explicit maxnreg
# wins): its spills cost less than a second, part-empty wave. Vim-Ti at batch 128 (1,536 programs, 132 SMs): +2.8%
# a graphed training step alone, +6.1% with the AFTER walk; capping Vim-S's grid (3 waves -> 2) made it 9% slower
# (H200). Not measured under DDP, where NCCL's kernels beside the backward take SMs and can undo the one wave.
CONV_BLOCK = dict(BE=128, BT=16)  # _conv_fwd, _conv_bwd_dx: channels and tokens a program; 128 x 16 ran the graphed
# training steps 1.7% (Vim-Ti) and 2.0% (Vim-S) faster than 32 x 64 (H200, one call)
CONV_DPRE = dict(BE=32, BT=16, SEG=256, num_warps=4)  # _conv_bwd_dpre: SEG tokens a program, in tiles of BT
# The inference scan (vimexp.ops.scan_one_pass), 8 channels a warp: the first of CONFIGS whose UP_TO bound the grid's
# warps an SM are within, else the last. Few warps an SM (Vim-Ti at 1248 px: batch 8, 5.8; 32, 23) leave each lane
# waiting on its loads: more register sets in flight (SETS: blocks loaded ahead) and L2 prefetches PF blocks ahead pay;
# many warps (batch 64: 47) are bound by registers, where the least pays. Against the two-pass kernel at 1248 px (H200
# sweeps, docs/optimisation.md step 40): batch 8 SETS 4 1.35x, SETS 3 1.26x, SETS 2 without prefetch 0.87x; batch 16
# and 32 SETS 3 1.60x / 1.52x, SETS 2 1.37x / 1.33x; batch 64 SETS 2 without prefetch 1.27x, SETS 3 1.11-1.22x.
LANES = dict(UP_TO=[8, 24], CONFIGS=[dict(num_warps=2, SETS=4, PF=8), dict(num_warps=2, SETS=3, PF=8),
                                     dict(num_warps=1, SETS=2, PF=0)])


class Blocks(NamedTuple):
    """The block configuration of every kernel launch (Triton constexprs and launch options)."""
    seq: dict  # _scan_seq at one chunk (length <= CL): BD, CL, num_warps
    seq_long: dict  # _scan_seq at longer lengths: BD, CL, num_warps, ONE_PASS (programs for one pass)
    seq_bwd: dict  # _scan_seq_bwd: BD, num_warps, WAVE_MAXNREG (its chunks are the forward's)
    conv: dict  # _conv_fwd, _conv_bwd_dx: BE, BT
    conv_dpre: dict  # _conv_bwd_dpre: BE, BT, SEG, num_warps
    lanes: dict  # scan_one_pass (inference): UP_TO (warps an SM), CONFIGS (num_warps, SETS, PF)


def tuned() -> Blocks:
    """The tuned blocks (the tables above, read at the call)."""
    return Blocks(SEQ, SEQ_LONG, SEQ_BWD, CONV_BLOCK, CONV_DPRE, LANES)


def with_blocks(base: Blocks | None = None, **tables: dict) -> Blocks:
    """`base` (default: the tuned blocks) with some entries of some tables replaced, in new dicts:
    with_blocks(seq_bwd=dict(BD=32)) is the tuned configuration with the backward scan at 32 channels a program."""
    base = base or tuned()
    return base._replace(**{name: {**getattr(base, name), **values} for name, values in tables.items()})


def seq_table(length: int, blocks: Blocks | None = None) -> str:
    """Which table the forward scan of this length reads: 'seq' (one chunk) or 'seq_long'."""
    return "seq" if length <= (blocks or tuned()).seq["CL"] else "seq_long"


def seq_config(length, blocks: Blocks | None = None) -> dict:
    """The forward scan's blocks at this length."""
    blocks = blocks or tuned()
    return getattr(blocks, seq_table(length, blocks))


def _seq_launch(batch, length, e, backward=False, blocks: Blocks | None = None):
    """(kernel options, chunk length, number of chunks, grid) of the channel-last scan kernels."""
    blocks = blocks or tuned()
    cfg = dict(seq_config(length, blocks))
    cl = cfg.pop("CL")
    if batch * 2 * triton.cdiv(e, cfg["BD"]) >= cfg.pop("ONE_PASS", float("inf")):
        cl = length  # one pass: the batch fills the GPU without chunks
    if backward:
        cfg = dict(blocks.seq_bwd)
    cap = cfg.pop("WAVE_MAXNREG", None)
    nc = triton.cdiv(length, cl)
    grid = (triton.cdiv(e, cfg["BD"]), batch * nc, 2)
    if cap and "maxnreg" not in cfg and _fits_one_wave_only_capped(math.prod(grid), cfg["num_warps"], cap):
        cfg["maxnreg"] = cap
    return cfg, cl, nc, grid


def _fits_one_wave_only_capped(programs: int, warps: int, cap: int) -> bool:
    """Whether `programs` of `warps` warps each fit the GPU at once with `cap` registers a thread but not with 255."""
    if not torch.cuda.is_available() or torch.version.hip:  # (ROCm's Triton has no maxnreg)
        return False
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    resident = lambda regs: sms * (65536 // (regs * 32 * warps))  # noqa: E731 (a register file of 64K an SM)
    return resident(255) < programs <= resident(cap)


# ------------------------------------------------------------------------------------------------------ launch
def aligned(n: int) -> int:
    """n rounded up to a multiple of 8: 16 bytes of bf16, the alignment cuBLAS's fast kernels want of every
    dimension and row stride."""
    return -(-n // 8) * 8


@triton.jit
def _pack_params(XP, DTP, A, WX, WDT, AT, R, RP, N2, E, NS, C1, C2, BLOCK: tl.constexpr):
    """One launch for what the GEMMs and scans take of the parameters: WX (2, RP + N2, E) = x_proj (2, R + N2, E)
    with zero rows from R to RP; WDT (2, E, RP) = dt_proj (2, E, R) with zero columns from R; both in WX's dtype; AT
    (2, NS, E) = A (2, E, NS) transposed. Programs [0, C1) write WX, [C1, C1 + C2) WDT, the rest AT."""
    pid = tl.program_id(0)
    if pid < C1:
        i = pid * BLOCK + tl.arange(0, BLOCK)
        rows = RP + N2
        ok = i < 2 * rows * E
        row = (i // E) % rows
        src = (i // (rows * E) * (R + N2) + tl.where(row < R, row, row - (RP - R))) * E + i % E
        tl.store(WX + i, tl.load(XP + src, mask=ok & ((row < R) | (row >= RP)), other=0.0), mask=ok)
    elif pid < C1 + C2:
        i = (pid - C1) * BLOCK + tl.arange(0, BLOCK)
        ok = i < 2 * E * RP
        j = i % RP
        tl.store(WDT + i, tl.load(DTP + i // RP * R + j, mask=ok & (j < R), other=0.0), mask=ok)
    else:
        i = (pid - C1 - C2) * BLOCK + tl.arange(0, BLOCK)
        ok = i < 2 * NS * E
        src = (i // (NS * E) * E + i % E) * NS + (i // E) % NS
        tl.store(AT + i, tl.load(A + src, mask=ok, other=0.0), mask=ok)


PACK_BLOCK = 1024


def pack_params(x_proj_w, dt_proj_w, A, dtype):
    """(wx, wdt, at): x_proj (2, R + 2N, E) and dt_proj (2, E, R) in `dtype` with R padded to R' = aligned(R) by
    zero rows / columns, so every GEMM around the scan is 16-byte aligned (2N is), and A (2, E, N) as the scans read
    it, (2, N, E). Vim-Ti's R + 2N = 44 had put the GEMMs on a slow unaligned kernel: 21% of its mixer's training
    time (H200), where Vim-S's 56 was aligned already. One launch: torch's casts, pads, concatenation and transpose
    were eight small kernels a mixer."""
    (_, e, r), n2, ns = dt_proj_w.shape, x_proj_w.shape[1] - dt_proj_w.shape[-1], A.shape[-1]
    rp = aligned(r)
    wx = torch.empty(2, rp + n2, e, device=A.device, dtype=dtype)
    wdt = torch.empty(2, e, rp, device=A.device, dtype=dtype)
    at = torch.empty(2, ns, e, device=A.device, dtype=A.dtype)
    c1, c2, c3 = (triton.cdiv(t.numel(), PACK_BLOCK) for t in (wx, wdt, at))
    _pack_params[(c1 + c2 + c3,)](x_proj_w.contiguous(), dt_proj_w.contiguous(), A.contiguous(), wx, wdt, at, r, rp,
                                  n2, e, ns, c1, c2, BLOCK=PACK_BLOCK)
    return wx, wdt, at


def scan_seq(xc, bc, dt, z, at, D, dt_bias, batch, blocks: Blocks | None = None):
    """Both passes of _scan_seq over channel-last inputs: xc and dt (2, batch*L, E), B and C side by side in float32
    bc (2, batch*L, 2N), z a (batch*L, E) view with row stride 2E, A transposed (2, N, E). Returns y2 (batch*L, 2E),
    SiLU(z) y_d of both directions side by side, and the chunk end states and summed deltas the backward starts
    from."""
    bl, e, n = xc.shape[1], xc.shape[2], at.shape[1]
    length = bl // batch
    cfg, cl, nc, grid = _seq_launch(batch, length, e, blocks=blocks)
    y2 = torch.empty(bl, 2 * e, device=xc.device, dtype=xc.dtype)
    hc = torch.empty(2, batch, nc, n, e, device=xc.device, dtype=torch.float32)
    sc = torch.empty(2, batch, nc, e, device=xc.device, dtype=torch.float32)
    for p in (0, 1) if nc > 1 else (1,):
        _scan_seq[grid](xc, bc, dt, z, at, D, dt_bias, y2, hc, sc, length, batch, e, nc, cl, n, PASS=p, **cfg)
    return y2, hc, sc


def _blocks(blocks: str) -> Blocks:
    """The ops take their blocks as JSON (a custom op's arguments are plain types); "" is the tuned blocks."""
    return Blocks(**json.loads(blocks)) if blocks else tuned()


def _projections(xz, batch, conv_w, conv_b, x_proj_w, dt_proj_w, A, blk: Blocks):
    """The scan's inputs from xz: the convs' outputs xc (2, batch*L, E), x_dbl (2, batch*L, R' + 2N) and dt (2,
    batch*L, E), through the packed parameters wx, wdt and A transposed (pack_params)."""
    xc = conv_forward(xz, conv_w, conv_b, batch, blk)
    wx, wdt, at = pack_params(x_proj_w, dt_proj_w, A, xz.dtype)
    x_dbl = torch.bmm(xc, wx.transpose(1, 2))  # (2, batch*L, R' + 2N)
    dt = torch.bmm(x_dbl[..., :wdt.shape[-1]], wdt.transpose(1, 2))  # (2, batch*L, E)
    return xc, x_dbl, dt, wx, wdt, at


def _forward_impl(xz: torch.Tensor, batch: int, conv_w: torch.Tensor, conv_b: torch.Tensor, x_proj_w: torch.Tensor,
                  dt_proj_w: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, blocks: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor]:
    """xz (batch*L, 2E) -> y2 (batch*L, 2E), SiLU(z) y_d of both directions side by side, channel-last; then what
    the backward starts from: the convs' outputs xc, x_dbl, float32 B and C, the chunk end states and summed deltas,
    and the packed parameters (pack_params). xc is kept rather than recomputed: 2.2 of a Vim-S training step's 92 ms
    of kernels for 1.9 GB (bf16, batch 128, H200)."""
    blk = _blocks(blocks)
    e = xz.shape[1] // 2
    xc, x_dbl, dt, wx, wdt, at = _projections(xz, batch, conv_w, conv_b, x_proj_w, dt_proj_w, A, blk)
    bc = x_dbl[..., wdt.shape[-1]:].float().contiguous()  # float32 B, C: the scan loads them every step
    y2, hc, sc = scan_seq(xc, bc, dt, xz[:, e:], at, D, dt_bias, batch, blk)
    return y2, xc, x_dbl, bc, hc, sc, wx, wdt, at


def _inference_impl(xz: torch.Tensor, batch: int, conv_w: torch.Tensor, conv_b: torch.Tensor,
                    x_proj_w: torch.Tensor, dt_proj_w: torch.Tensor, A: torch.Tensor, D: torch.Tensor,
                    dt_bias: torch.Tensor, blocks: str) -> torch.Tensor:
    """y2 alone, where no gradient is taken: through the one-pass scan where _one_pass says so, which keeps nothing
    for a backward; else through scan_seq."""
    blk = _blocks(blocks)
    e = xz.shape[1] // 2
    xc, x_dbl, dt, _, wdt, at = _projections(xz, batch, conv_w, conv_b, x_proj_w, dt_proj_w, A, blk)
    from vimexp.ops import scan_one_pass  # (it imports this module)
    if not _one_pass(xz, A.shape[-1]):
        return scan_seq(xc, x_dbl[..., wdt.shape[-1]:].float().contiguous(), dt, xz[:, e:], at, D, dt_bias, batch,
                        blk)[0]
    bc = scan_one_pass.padded_bc(x_dbl[..., wdt.shape[-1]:])
    return scan_one_pass.scan_one_pass(xc, bc, dt, xz[:, e:], A, D, dt_bias, batch,
                                       scan_one_pass.launch_config(batch, e, blk.lanes))


def _one_pass(xz: torch.Tensor, d_state: int) -> bool:
    """Whether inference runs scan_one_pass: on a GPU (Triton's CPU interpreter cannot run Gluon) at its 16 states."""
    return xz.is_cuda and d_state == 16


mixer_inference = torch.library.custom_op("vimexp::bimixer_scan_inference", _inference_impl, mutates_args=())


@mixer_inference.register_fake
def _(xz, batch, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, blocks):
    return torch.empty_like(xz)


def _run_inference(*args):
    """The op while compiling or exporting, its implementation eagerly (no dispatch cost: see custom_ops)."""
    return mixer_inference(*args) if torch.compiler.is_compiling() else _inference_impl(*args)


_mixer_forward = torch.library.custom_op("vimexp::bimixer_scan", _forward_impl, mutates_args=())


@_mixer_forward.register_fake
def _(xz, batch, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, blocks):
    (bl, e2), r, n = xz.shape, aligned(dt_proj_w.shape[-1]), A.shape[-1]
    _, _, nc, _ = _seq_launch(batch, bl // batch, e2 // 2, blocks=_blocks(blocks))
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(xz), xz.new_empty((2, bl, e2 // 2)), xz.new_empty((2, bl, r + 2 * n)),
            xz.new_empty((2, bl, 2 * n), **f32),
            xz.new_empty((2, batch, nc, n, e2 // 2), **f32), xz.new_empty((2, batch, nc, e2 // 2), **f32),
            xz.new_empty((2, r + 2 * n, e2 // 2)), xz.new_empty((2, e2 // 2, r)), xz.new_empty((2, n, e2 // 2), **f32))


def _backward_impl(dy2: torch.Tensor, xz: torch.Tensor, batch: int, conv_w: torch.Tensor, conv_b: torch.Tensor,
                   xc: torch.Tensor, x_dbl: torch.Tensor, bc: torch.Tensor, wx: torch.Tensor, wdt: torch.Tensor,
                   at: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, hc: torch.Tensor, sc: torch.Tensor,
                   dt_rank: int, blocks: str) -> list[torch.Tensor]:
    """The gradients of xz; of conv_w, conv_b, D and dt_bias, flattened side by side in one float32 tensor; and of
    x_proj_w, dt_proj_w and A in float32."""
    blk, dtype, (bl, e2) = _blocks(blocks), xz.dtype, xz.shape
    length, e, r, n, k = bl // batch, e2 // 2, wdt.shape[-1], at.shape[1], conv_w.shape[-1]
    dt = torch.bmm(x_dbl[..., :r], wdt.transpose(1, 2))  # recomputed: one small GEMM
    f32 = dict(device=xz.device, dtype=torch.float32)
    du, ddt = torch.empty_like(xc), torch.empty_like(dt)
    dz = torch.empty(2, bl, e, device=xz.device, dtype=dtype)  # each direction's, summed by _conv_bwd_dx
    # what the kernels sum into with atomics, zeroed in two fills: dB and C, and the parameters' gradients
    dbc = torch.zeros(2, bl, 2 * n, **f32)
    dparams, dat = torch.zeros(2 * e * (k + 3 + n), **f32).split([2 * e * (k + 3), 2 * e * n])
    dconv_w, dconv_b, dD, ddt_bias = _param_grads(dparams, e, k)
    dat = dat.view(2, n, e)
    cfg, cl, nc, grid = _seq_launch(batch, length, e, backward=True, blocks=blk)
    hs = torch.empty(2, batch, length // 2, n, e, device=xz.device, dtype=dtype)  # every other state
    gq = torch.empty(2, batch, nc, n, e, **f32)
    hin = torch.empty(2, batch, nc, n, e, **f32) if nc > 1 else gq  # (one chunk: its entering state is zero)
    for p in (0, 1) if nc > 1 else (1,):
        _scan_seq_bwd[grid](xc, bc, dt, xz[:, e:], at, D, dt_bias, dy2.contiguous(), hc, sc, gq, hs, hin, du, ddt,
                            dbc, dz, dat, dD, ddt_bias, length, batch, e, nc, cl, n, PASS=p, **cfg)
    dx_dbl = torch.cat([torch.bmm(ddt, wdt), dbc], dim=2, out=torch.empty_like(x_dbl))  # (2, batch*L, R' + 2N)
    d_dt_proj_w = torch.bmm(ddt.transpose(1, 2), x_dbl[..., :r])[..., :dt_rank].float()
    d_x_proj_w = torch.bmm(dx_dbl.transpose(1, 2), xc)
    d_x_proj_w = torch.cat([d_x_proj_w[:, :dt_rank], d_x_proj_w[:, r:]], dim=1,  # the padding rows dropped
                           out=torch.empty(2, dt_rank + 2 * n, e, **f32))
    dxc = du.baddbmm_(dx_dbl, wx)  # in place: out of place, torch first copies du (0.4 ms a Vim-Ti step, H200)
    dpre = torch.empty(2, bl, e, device=xz.device, dtype=dtype)  # feeds dx (in dtype) alone: dW and the bias
    # gradient come from the float32 value in _conv_bwd_dpre's registers
    dxz = torch.empty_like(xz)
    conv, dpre_cfg = blk.conv, blk.conv_dpre
    _conv_bwd_dpre[_dpre_grid(batch, length, e, dpre_cfg)](xz, conv_w, conv_b, dxc, dpre, dconv_w, dconv_b, length,
                                                           1, e2, bl * e, 1, e, e, k, triton.next_power_of_2(k),
                                                           **dpre_cfg)
    _conv_bwd_dx[_conv_grid(batch, length, e, conv)](conv_w, dpre, dz, dxz, length, bl * e, 1, e, 1, e2, e, k,
                                                     **conv)
    return [dxz, dparams, d_x_proj_w, d_dt_proj_w, dat.transpose(1, 2).contiguous()]


def _param_grads(flat: torch.Tensor, e: int, k: int) -> tuple[torch.Tensor, ...]:
    """The gradients of conv_w (2, E, K), conv_b, D and dt_bias (2, E) as views of `flat`, side by side."""
    dconv_w, dconv_b, dD, ddt_bias = flat.split([2 * e * k, 2 * e, 2 * e, 2 * e])
    return dconv_w.view(2, e, k), dconv_b.view(2, e), dD.view(2, e), ddt_bias.view(2, e)


_mixer_backward = torch.library.custom_op("vimexp::bimixer_scan_backward", _backward_impl, mutates_args=())


@_mixer_backward.register_fake
def _(dy2, xz, batch, conv_w, conv_b, xc, x_dbl, bc, wx, wdt, at, D, dt_bias, hc, sc, dt_rank, blocks):
    (_, n, e), k, f32 = at.shape, conv_w.shape[-1], dict(dtype=torch.float32)
    return [torch.empty_like(xz), xz.new_empty((2 * e * (k + 3),), **f32),
            xz.new_empty((2, wx.shape[1] - wdt.shape[-1] + dt_rank, e), **f32),
            xz.new_empty((2, e, dt_rank), **f32), xz.new_empty((2, e, n), **f32)]


def _save_for_backward(ctx, inputs, output):
    xz, batch, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, blocks = inputs
    _, xc, x_dbl, bc, hc, sc, wx, wdt, at = output
    ctx.save_for_backward(xz, conv_w, conv_b, xc, x_dbl, bc, wx, wdt, at, D, dt_bias, hc, sc)
    ctx.batch, ctx.blocks, ctx.dt_rank = batch, blocks, dt_proj_w.shape[-1]
    ctx.dtypes = [t.dtype for t in (conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias)]


def _mixer_gradients(ctx, dy2, *_):  # hand-written gradients: no second derivative (the backward op has none)
    if dy2 is None:  # (y2 unused)
        return (None,) * 10
    xz, conv_w, conv_b, xc, x_dbl, bc, wx, wdt, at, D, dt_bias, hc, sc = ctx.saved_tensors
    backward = _backward_impl if getattr(ctx, "eager", False) else _mixer_backward
    dxz, dparams, *dprojections = backward(dy2, xz, ctx.batch, conv_w, conv_b, xc, x_dbl, bc, wx, wdt, at, D, dt_bias,
                                           hc, sc, ctx.dt_rank, ctx.blocks)
    dconv_w, dconv_b, dD, ddt_bias = _param_grads(dparams, *conv_w.shape[1:])
    grads = (dconv_w, dconv_b, *dprojections, dD, ddt_bias)
    return dxz, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None


_mixer_forward.register_autograd(_mixer_gradients, setup_context=_save_for_backward)
mixer_forward = eager_fast(_mixer_forward, _forward_impl, _save_for_backward, _mixer_gradients, differentiable=1)


def bimixer_channel_last(hidden, batch, in_proj_w, conv_w, conv_b, x_proj_w, dt_proj_w, A, D, dt_bias, out_proj_w,
                         blocks: Blocks | None = None):
    """The whole mixer, channel-last: hidden (batch*L, d_model) -> (batch*L, d_model), for out_proj_w already
    carrying the halving. The two directions' gated outputs sit side by side, (batch*L, 2E), so out_proj sums them
    in its GEMM (weight [W, W]). blocks: every kernel's block configuration (default: the tuned one)."""
    xz = F.linear(hidden, in_proj_w.to(hidden.dtype))  # (batch*L, 2E)
    length, n, r = xz.shape[0] // batch, A.shape[-1], dt_proj_w.shape[-1]
    params = (conv_w.contiguous(), conv_b.contiguous(), x_proj_w, dt_proj_w, A.contiguous(), D.contiguous(),
              dt_bias.contiguous(), json.dumps(blocks._asdict()) if blocks else "")
    inference = not (torch.is_grad_enabled() and (xz.requires_grad or any(p.requires_grad for p in params[:-1])))
    mixer = _run_inference if inference else lambda *args: mixer_forward(*args)[0]
    step = max_batch(length, conv_w.shape[1], n, r, blocks, inference and _one_pass(xz, n))  # more: launches
    y2 = torch.cat([mixer(part, part.shape[0] // length, *params)
                    for part in xz.split(step * length)]) if batch > step else mixer(xz, batch, *params)
    return F.linear(y2, torch.cat([out_proj_w, out_proj_w], dim=1).to(y2.dtype))


# ------------------------------------------------------------------------------------------------ conv launch
def _conv_grid(batch, length, e, conv: dict):
    return triton.cdiv(length, conv["BT"]), batch, triton.cdiv(e, conv["BE"])


def _dpre_grid(batch, length, e, conv_dpre: dict):
    return triton.cdiv(length, conv_dpre["SEG"]), batch, triton.cdiv(e, conv_dpre["BE"])


def conv_forward(xz, conv_w, conv_b, batch, blocks: Blocks | None = None):
    """SiLU(conv_d(x)) of both directions, channel-last: xz (batch*L, 2E) -> (2, batch*L, E)."""
    conv = (blocks or tuned()).conv
    e, bl = conv_w.shape[1], xz.shape[0]
    xc = torch.empty(2, bl, e, device=xz.device, dtype=xz.dtype)
    # strides: x (channel, token), output (direction, channel, token)
    _conv_fwd[_conv_grid(batch, bl // batch, e, conv)](xz, conv_w, conv_b, xc, bl // batch, 1, 2 * e, bl * e, 1, e, e,
                                                       conv_w.shape[-1], **conv)
    return xc


MAX_ELEMENTS = 2 ** 31 - 1  # the kernels' offsets are 32-bit
MAX_GRID_AXIS = 2 ** 16 - 1  # CUDA's limit on a grid's second axis (batch x chunks)


def max_batch(length: int, d_inner: int, d_state: int, dt_rank: int, blocks: Blocks | None = None,
              inference: bool = False) -> int:
    """The largest batch one launch takes: every buffer within 32-bit offsets, batch x chunks within a grid axis.
    Inference (scan_one_pass) keeps neither the backward's scratch nor chunk states, and has no chunks."""
    chunks = 1 if inference else triton.cdiv(length, seq_config(length, blocks)["CL"])
    per_sample = max(2 * d_inner * length, 2 * (aligned(dt_rank) + 2 * d_state) * length,
                     0 if inference else 2 * d_inner * d_state * (length // 2),  # the backward's state scratch
                     2 * d_inner * d_state * chunks)  # chunk states and adjoints
    return max(1, min(MAX_ELEMENTS // per_sample, MAX_GRID_AXIS // chunks))
