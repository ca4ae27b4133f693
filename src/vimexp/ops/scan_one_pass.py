"""The inference scan of the fused mixer: one pass over the whole sequence, each channel's 16 states spread over 4
lanes, written in Gluon (Triton's layout-explicit dialect) because plain Triton does not place lanes this way.

Where no gradient is taken, this replaces `fused_mixer._scan_seq`, whose lane owns all 16 states of a channel: a
batch of 8 at 1248 px has too few channels to fill the GPU that way, so that kernel scans in two passes over chunks
and pays every exponential twice. Here a warp owns 8 channels of one (batch, direction):

- lane l holds states 4j .. 4j+3 (j = l % 4) of channel c = l // 4 (more channels in the program's other warps);
- the sequence goes in blocks of K = 4 steps. The per-(step, channel) work (softplus of dt, delta * u, the gate,
  D u, the store) runs once, one (channel, step) a lane, in tensors laid out (CH, K);
- step k's delta and delta * u reach the channel's 4 lanes by an indexed warp shuffle from lane 4c + k;
- the partial outputs (h C summed over a lane's 4 states, one per step) are reduce-scattered over the channel's
  lanes by two butterfly shuffles, after which lane j holds step j's output: back in the (CH, K) layout.
No shared memory and no barrier (Triton's own layout conversions went through shared memory: 1.09-1.16x slower,
H200); 10 instructions and 1.19 exponentials a state update (sm_90, Triton 3.6). Measured against the two-pass
kernel: docs/optimisation.md step 40.

The CPU tests compile it for sm_90 (no spills, no barrier); Triton's interpreter cannot run Gluon, so on a CPU the
fused path's inference keeps the two-pass kernel, and the GPU tests check this one against float64 and mamba-ssm.
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from vimexp.ops.fused_mixer import _softplus  # a Triton function: Gluon calls it on its own tensors

N = 16  # states a channel (4 lanes x 4 registers)
K = 4  # steps a block
PAD = 8 * K  # rows read past either end of B and C, unmasked (see padded_bc): (2 SETS - 1) K + 3, 31 at SETS 4


def layouts(warps: int):
    """(channels a program, the state tile's layout (CH, 4 lanes j, 4 registers s), a block of B or C's layout
    (4 lanes j, 4 registers s, K registers), the same in each channel's lanes)."""
    ch = 8 * warps
    wb = [1 << (3 + i) for i in range(warps.bit_length() - 1)]
    states = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [0, 0, 2]],
                                        lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
                                        warp_bases=[[w, 0, 0] for w in wb], block_bases=[], shape=[ch, 4, 4])
    bc = gl.DistributedLinearLayout(reg_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2]],
                                    lane_bases=[[1, 0, 0], [2, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
                                    warp_bases=[[0, 0, 0] for _ in wb], block_bases=[], shape=[4, 4, K])
    return ch, states, bc


@gluon.jit
def _shfl_idx(x, src):
    r = gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r",
                                  [x.to(gl.int32, bitcast=True), src], dtype=gl.int32, is_pure=True, pack=1)
    return r.to(gl.float32, bitcast=True)


@gluon.jit
def _shfl_xor(x, MASK: gl.constexpr):
    if MASK == 1:
        r = gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, 0xffffffff;", "=r,r",
                                      [x.to(gl.int32, bitcast=True)], dtype=gl.int32, is_pure=True, pack=1)
    else:
        r = gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;", "=r,r",
                                      [x.to(gl.int32, bitcast=True)], dtype=gl.int32, is_pure=True, pack=1)
    return r.to(gl.float32, bitcast=True)


@gluon.jit
def _prefetch(p):
    """prefetch.global.L2 of each address (the op's result, 0, is unused)."""
    return gl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _steps_of(x, SL: gl.constexpr):
    """A block of B or C (4, 4, K) -> its K (4, 4) tiles, one a step, in layout SL (K is in registers: no data
    moves)."""
    x = gl.reshape(x, [4, 4, 2, 2])
    x02, x13 = gl.split(x)
    x0, x2 = gl.split(x02)
    x1, x3 = gl.split(x13)
    return (gl.convert_layout(x0, SL, assert_trivial=True), gl.convert_layout(x1, SL, assert_trivial=True),
            gl.convert_layout(x2, SL, assert_trivial=True), gl.convert_layout(x3, SL, assert_trivial=True))


@gluon.jit
def _load_block(PU, PDT, PZ, PBC, i0, L, E, k_p, ok_e, N: gl.constexpr, SGN: gl.constexpr):
    """Block i0's inputs: u, dt, z (CH, K) in float32; B and C (4, 4, K). The per-channel loads past the sequence's
    end are masked; B and C's are not (other rows of the buffer, padded at its ends): their steps update only the
    state after the end."""
    ok = ok_e & (i0 + k_p < L)[None, :]
    step = SGN * i0
    u = gl.load(PU + step * E, mask=ok, other=0.0).to(gl.float32)
    dt = gl.load(PDT + step * E, mask=ok, other=0.0).to(gl.float32)
    z = gl.load(PZ + step * 2 * E, mask=ok, other=0.0).to(gl.float32)
    p = PBC + step * 2 * N
    return u, dt, z, gl.load(p), gl.load(p + N)


@gluon.jit
def _step(h, A3, dk, duk, Bk, Ck):
    h = gl.exp2(gl.expand_dims(dk, 2) * A3) * h + gl.expand_dims(duk, 2) * gl.expand_dims(Bk, 0)
    return h, gl.sum(h * gl.expand_dims(Ck, 0), axis=2)


@gluon.jit
def _block(h, A3, Dd, bias, u, dt, z, Bt, Ct, src0, hi1, hi0, SLJ: gl.constexpr):
    """K steps from state h: the state, and SiLU(z) y to store."""
    delta = _softplus(dt + bias)
    du = delta * u
    B0, B1, B2, B3 = _steps_of(Bt, SLJ)
    C0, C1, C2, C3 = _steps_of(Ct, SLJ)
    h, y0 = _step(h, A3, _shfl_idx(delta, src0), _shfl_idx(du, src0), B0, C0)
    h, y1 = _step(h, A3, _shfl_idx(delta, src0 + 1), _shfl_idx(du, src0 + 1), B1, C1)
    h, y2 = _step(h, A3, _shfl_idx(delta, src0 + 2), _shfl_idx(du, src0 + 2), B2, C2)
    h, y3 = _step(h, A3, _shfl_idx(delta, src0 + 3), _shfl_idx(du, src0 + 3), B3, C3)
    # reduce-scatter over the channel's 4 lanes: lanes with j & 2 keep steps 2 and 3, then lanes with j & 1 the odd
    # step, so that lane j ends with step j's sum
    r0 = gl.where(hi1, y2, y0) + _shfl_xor(gl.where(hi1, y0, y2), 2)
    r1 = gl.where(hi1, y3, y1) + _shfl_xor(gl.where(hi1, y1, y3), 2)
    y = gl.where(hi0, r1, r0) + _shfl_xor(gl.where(hi0, r0, r1), 1) + Dd * u
    sig = 1.0 / (1.0 + gl.exp2(z * -1.4426950408889634))
    return h, y * z * sig


@gluon.jit
def _store(PY, out, i0, L, E, k_p, ok_e, SGN: gl.constexpr):
    gl.store(PY + SGN * i0 * 2 * E, out, mask=ok_e & (i0 + k_p < L)[None, :])


@gluon.jit
def _scan_one_pass(U, BC, DT, Z, A, D, DTB, Y2, L, B, E, CH: gl.constexpr, LS: gl.constexpr, LBC: gl.constexpr,
                   SETS: gl.constexpr, PF: gl.constexpr):
    """Program (channel block, batch, direction): the direction a constexpr in each branch, so that its steps
    through memory are immediates."""
    if gl.program_id(2) == 0:
        _scan_direction(U, BC, DT, Z, A, D, DTB, Y2, L, B, E, CH, LS, LBC, SETS, PF, 0)
    else:
        _scan_direction(U, BC, DT, Z, A, D, DTB, Y2, L, B, E, CH, LS, LBC, SETS, PF, 1)


@gluon.jit
def _scan_direction(U, BC, DT, Z, A, D, DTB, Y2, L, B, E, CH: gl.constexpr, LS: gl.constexpr, LBC: gl.constexpr,
                    SETS: gl.constexpr, PF: gl.constexpr, DIR: gl.constexpr):
    """SETS (2-4) blocks an iteration, each block's inputs loaded SETS - 1 blocks ahead into register sets that the
    unrolled loop keeps in place; with PF > 0, L2 prefetches PF blocks ahead as well (where few warps share an SM)."""
    N: gl.constexpr = 16
    Kc: gl.constexpr = 4
    SGN: gl.constexpr = 1 - 2 * DIR
    P2: gl.constexpr = gl.SliceLayout(2, LS)  # (CH, K): one (channel, step) a lane
    SLJ: gl.constexpr = gl.SliceLayout(0, LS)  # (4, 4) a step's B or C, as each channel's lanes hold them
    e0 = gl.program_id(0) * CH
    BL = B * L
    first = gl.program_id(1) * L + DIR * (L - 1)  # the first row in scan order
    # (CH, K) indices: a lane's channel, and its step k in the per-channel tensors, which is also its j (states
    # 4j .. 4j+3) in the state tile
    c_p = gl.arange(0, CH, layout=gl.SliceLayout(1, P2))
    k_p = gl.arange(0, Kc, layout=gl.SliceLayout(0, P2))
    e_p = e0 + c_p
    # A and the state, (CH, 4, 4): state n = 4j + s
    s3 = gl.arange(0, 4, layout=gl.SliceLayout(0, SLJ))
    e3 = gl.expand_dims(gl.expand_dims(e_p, 1), 2)
    n3 = gl.expand_dims(gl.expand_dims(k_p, 0), 2) * 4 + gl.expand_dims(gl.expand_dims(s3, 0), 0)
    A3 = gl.load(A + (DIR * E + e3) * N + n3, mask=e3 < E, other=0.0) * 1.4426950408889634  # exp via exp2
    h = gl.zeros([CH, 4, 4], gl.float32, LS)
    # per-channel values and pointers (CH, K) at block 0
    ok_e = (e_p < E)[:, None]
    Dd = gl.load(D + DIR * E + e_p, mask=e_p < E, other=0.0)[:, None]
    bias = gl.load(DTB + DIR * E + e_p, mask=e_p < E, other=0.0)[:, None]
    row_p = first + SGN * k_p[None, :]
    PU = U + (DIR * BL + row_p) * E + e_p[:, None]
    PDT = DT + (DIR * BL + row_p) * E + e_p[:, None]
    PZ = Z + row_p * 2 * E + e_p[:, None]
    PY = Y2 + row_p * 2 * E + DIR * E + e_p[:, None]
    src0 = ((c_p % 8) * 4)[:, None] + k_p[None, :] * 0  # the lane holding (channel, step 0)
    j = c_p[:, None] * 0 + k_p[None, :]
    hi1 = (j & 2) != 0
    hi0 = (j & 1) != 0
    # B and C of a block (4 j, 4 s, K), each lane loading its j's
    j_bc = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, LBC)))
    s_bc = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LBC)))
    k_bc = gl.arange(0, Kc, layout=gl.SliceLayout(0, gl.SliceLayout(0, LBC)))
    bc_rel = (gl.expand_dims(gl.expand_dims(j_bc, 1) * 4 + gl.expand_dims(s_bc, 0), 2)
              + SGN * gl.expand_dims(gl.expand_dims(k_bc, 0), 0) * 2 * N)
    PBC = BC + (DIR * BL + first) * 2 * N + bc_rel
    if PF > 0:  # the prefetches' pointers: rows and channels clamped into the tensors
        row_f = first + SGN * gl.minimum(k_p, L - 1)[None, :]
        e_f = gl.minimum(e_p, E - 1)[:, None]
        FU = U + (DIR * BL + row_f) * E + e_f
        FDT = DT + (DIR * BL + row_f) * E + e_f
        FZ = Z + row_f * 2 * E + e_f
        FBC = BC + (DIR * BL + row_f) * 2 * N + e_f * 0
    u, dt, z, Bt, Ct = _load_block(PU, PDT, PZ, PBC, 0, L, E, k_p, ok_e, N, SGN)
    u2, dt2, z2, Bt2, Ct2 = _load_block(PU, PDT, PZ, PBC, Kc, L, E, k_p, ok_e, N, SGN)
    if SETS >= 3:
        u3, dt3, z3, Bt3, Ct3 = _load_block(PU, PDT, PZ, PBC, 2 * Kc, L, E, k_p, ok_e, N, SGN)
    if SETS == 4:
        u4, dt4, z4, Bt4, Ct4 = _load_block(PU, PDT, PZ, PBC, 3 * Kc, L, E, k_p, ok_e, N, SGN)
    for i0 in range(0, L, SETS * Kc):
        if PF > 0:
            for q in gl.static_range(SETS):
                ahead = SGN * gl.minimum(i0 + (PF + q) * Kc, gl.maximum(L - Kc, 0))
                _prefetch(FU + ahead * E)
                _prefetch(FDT + ahead * E)
                _prefetch(FZ + ahead * 2 * E)
                _prefetch(FBC + ahead * 2 * N)
        h, o1 = _block(h, A3, Dd, bias, u, dt, z, Bt, Ct, src0, hi1, hi0, SLJ)
        u, dt, z, Bt, Ct = _load_block(PU, PDT, PZ, PBC, i0 + SETS * Kc, L, E, k_p, ok_e, N, SGN)
        h, o2 = _block(h, A3, Dd, bias, u2, dt2, z2, Bt2, Ct2, src0, hi1, hi0, SLJ)
        u2, dt2, z2, Bt2, Ct2 = _load_block(PU, PDT, PZ, PBC, i0 + (SETS + 1) * Kc, L, E, k_p, ok_e, N, SGN)
        if SETS >= 3:
            h, o3 = _block(h, A3, Dd, bias, u3, dt3, z3, Bt3, Ct3, src0, hi1, hi0, SLJ)
            u3, dt3, z3, Bt3, Ct3 = _load_block(PU, PDT, PZ, PBC, i0 + (SETS + 2) * Kc, L, E, k_p, ok_e, N, SGN)
        if SETS == 4:
            h, o4 = _block(h, A3, Dd, bias, u4, dt4, z4, Bt4, Ct4, src0, hi1, hi0, SLJ)
            u4, dt4, z4, Bt4, Ct4 = _load_block(PU, PDT, PZ, PBC, i0 + 7 * Kc, L, E, k_p, ok_e, N, SGN)
        # the stores after every load: the compiler keeps loads behind earlier stores (the pointers may alias), so
        # a store between blocks would hold the next loads back to the end of the iteration
        _store(PY, o1, i0, L, E, k_p, ok_e, SGN)
        _store(PY, o2, i0 + Kc, L, E, k_p, ok_e, SGN)
        if SETS >= 3:
            _store(PY, o3, i0 + 2 * Kc, L, E, k_p, ok_e, SGN)
        if SETS == 4:
            _store(PY, o4, i0 + 3 * Kc, L, E, k_p, ok_e, SGN)


def padded_bc(bc_view: torch.Tensor) -> torch.Tensor:
    """B and C (2, batch*L, 2N) as the scan reads them: float32, in the middle of a buffer with PAD rows either
    side, so that its unmasked loads past the ends stay in memory."""
    two, bl, n2 = bc_view.shape
    buf = torch.empty(2 * bl + 2 * PAD, n2, device=bc_view.device, dtype=torch.float32)
    bc = buf[PAD:PAD + 2 * bl].view(two, bl, n2)
    bc.copy_(bc_view)
    return bc


def launch_config(batch: int, e: int, table: dict) -> dict:
    """The launch for this grid from fused_mixer's LANES table: the first configuration whose UP_TO bound the grid's
    warps an SM (at 8 channels a warp) are within, else the last."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    warps_an_sm = batch * 2 * triton.cdiv(e, 8) / sms
    tier = next((i for i, bound in enumerate(table["UP_TO"]) if warps_an_sm <= bound), len(table["UP_TO"]))
    return dict(table["CONFIGS"][tier])


def scan_one_pass(xc, bc, dt, z, A, D, dt_bias, batch, config: dict) -> torch.Tensor:
    """xc and dt (2, batch*L, E), bc from padded_bc, z a (batch*L, E) view with row stride 2E, A (2, E, 16) ->
    y2 (batch*L, 2E): SiLU(z) y_d of both directions side by side, as fused_mixer.scan_seq gives it."""
    bl, e = xc.shape[1], xc.shape[2]
    assert A.shape[-1] == N and bc.shape[-1] == 2 * N, "the one-pass scan takes 16 states"
    cfg = dict(config)
    ch, states, bc_layout = layouts(cfg.pop("num_warps"))
    y2 = torch.empty(bl, 2 * e, device=xc.device, dtype=xc.dtype)
    _scan_one_pass[(triton.cdiv(e, ch), batch, 2)](xc, bc, dt, z, A, D, dt_bias, y2, bl // batch, batch, e, ch,
                                                   states, bc_layout, num_warps=ch // 8, **cfg)
    return y2
