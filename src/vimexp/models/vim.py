"""Vision Mamba (Vim), layer for layer and key for key as the official implementation (hustvl/Vim).

Patch embedding -> class token(s) -> + position embedding -> Blocks (add -> RMSNorm -> bidirectional Mamba mixer,
residual stream in fp32) -> add -> RMSNorm -> token selection -> linear head. The released models use bimamba v2 (a
full second SSM branch on the flipped sequence, sharing in_proj and out_proj, outputs averaged) and a class token in
the middle of the sequence. The paper's ablations (Tables 4 and 5) are constructor options:

    bidirectional: none | sequence | block | ssm | ssm_conv      pool: mean | max | head | double | middle

`rope=True` (with `rope_residual`) adds the official 2-D rotary position embedding of the dense backbones before every
layer (docs/official_impl.md §1.10).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, trunc_normal_

from vimexp import VimexpError
from vimexp.ops import KernelBackend, backend

# the paper's bidirectional strategies -> (mixer variant, whole-sequence flip in training, paired blocks)
BIDIRECTIONAL = {
    "none": ("none", False, False),
    "sequence": ("none", True, False),
    "block": ("none", False, True),
    "ssm": ("v1", False, False),
    "ssm_conv": ("v2", False, False),
}
POOLS = ("mean", "max", "head", "double", "middle")
# what forward_intermediates returns per layer: the residual stream (official use_residual_as_feature=True, last
# layer 'add') or the mixer output (use_residual_as_feature=False)
FEATURES = ("residual_plus_hidden", "hidden")


def cls_token_positions(pool: str, num_patches: int) -> list[int]:
    """Sequence indices of the class token(s) of `pool` among `num_patches` patch tokens."""
    return {"head": [0], "middle": [num_patches // 2], "double": [0, num_patches + 1]}.get(pool, [])


class VimMixer(nn.Module):
    """Mamba mixer with Vim's backward branch. bimamba: 'none' (unidirectional), 'v1' (extra backward scan with its own
    A, sharing conv/x_proj/dt_proj/D) or 'v2' (a complete backward branch; only in_proj and out_proj are shared).
    On the cuda kernels each direction (bimamba none/v2) runs as one autograd node (vimexp.ops.mixer_branch);
    recompute makes it recompute the conv output in the backward, as the official fused mixer does: the official
    training memory (Vim-S, bf16, batch 128: 9.0 instead of 10.7 GiB) for 2-3% speed on an H100
    (experiments/results/bench_h100/train_recompute/).
    `kernel` is a kernel name or the model's resolved vimexp.ops backend."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, bimamba="v2", divide_out=True,
                 kernel: str | KernelBackend = "torch", recompute=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        if bimamba not in ("none", "v1", "v2"):
            raise VimexpError(f"unknown bimamba variant {bimamba!r}: choose none, v1 or v2")
        self.backend = (backend(kernel) if isinstance(kernel, str) else kernel).for_state_size(d_state)
        self.bimamba, self.divide_out, self.recompute = bimamba, divide_out, recompute
        d_inner = expand * d_model
        self.d_state, self.dt_rank = d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj = self._branch(d_inner, d_conv)
        self.A_log = nn.Parameter(self._a_log_init(d_inner))
        self.D = nn.Parameter(torch.ones(d_inner))
        self._init_dt(self.dt_proj, dt_min, dt_max, dt_init_floor)
        if bimamba in ("v1", "v2"):
            self.A_b_log = nn.Parameter(self._a_log_init(d_inner))
        if bimamba == "v2":
            # dt_proj_b keeps PyTorch's default init; its bias is zeroed by the model init (official behaviour)
            self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._branch(d_inner, d_conv)
            self.D_b = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _branch(self, d_inner, d_conv):
        conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        return conv, x_proj, nn.Linear(self.dt_rank, d_inner, bias=True)

    def _a_log_init(self, d_inner):  # S4D-real: A = -(1..N) on every channel
        return torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)

    def _init_dt(self, dt_proj, dt_min, dt_max, floor):
        nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():  # inverse softplus, so that softplus(bias) = dt
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True

    def _scan(self, x, z, conv, x_proj, dt_proj, A_log, D, ops, conv_out=None):
        """One direction on channel-major (batch, E, L) inputs: causal conv + SiLU, input-dependent dt/B/C, scan, gate."""
        if conv_out is None and ops.mixer_branch is not None:  # cuda: one autograd node
            return ops.mixer_branch(x, z, conv.weight.squeeze(1), conv.bias, x_proj.weight, dt_proj.weight,
                                    -torch.exp(A_log.float()), D.float(), dt_proj.bias.float(), self.dt_rank,
                                    self.d_state, recompute=self.recompute)
        if conv_out is None:
            conv_out = ops.causal_conv1d(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        x_dbl = F.linear(conv_out.transpose(1, 2), x_proj.weight)  # (batch, L, dt_rank + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2).contiguous()
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        A = -torch.exp(A_log.float())
        return ops.selective_scan(conv_out, dt, A, B, C, D.float(), z=z, delta_bias=dt_proj.bias.float(),
                                  delta_softplus=True)

    @property
    def kernel(self) -> str:
        return self.backend.name

    def _forward_fused(self, hidden):
        """bimamba v2 through the backend's Triton kernels: no flips, one scan kernel."""
        batch, seqlen, dim = hidden.shape
        conv_w, conv_b, x_proj_w, dt_proj_w, A_log, D, dt_bias = _stacked_pairs(
            (self.conv1d.weight.squeeze(1), self.conv1d_b.weight.squeeze(1)), (self.conv1d.bias, self.conv1d_b.bias),
            (self.x_proj.weight, self.x_proj_b.weight), (self.dt_proj.weight, self.dt_proj_b.weight),
            (self.A_log, self.A_b_log), (self.D, self.D_b), (self.dt_proj.bias, self.dt_proj_b.bias))
        args = (conv_w, conv_b, x_proj_w, dt_proj_w, -torch.exp(A_log.float()), D.float(), dt_bias.float())
        weight = self.out_proj.weight * 0.5 if self.divide_out else self.out_proj.weight
        if torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
        return self.backend.bimixer(hidden.reshape(-1, dim), batch, self.in_proj.weight, *args,
                                    weight).view(batch, seqlen, -1)

    def forward(self, hidden):
        batch, seqlen, dim = hidden.shape
        if self.bimamba == "v2" and self.backend.runs_fused():
            return self._forward_fused(hidden)
        ops = self.backend.ops
        # (2E, batch*L) -> (batch, 2E, L) view with the token axis contiguous, as the kernels want
        xz = (self.in_proj.weight @ hidden.reshape(-1, dim).transpose(0, 1)).view(-1, batch, seqlen).transpose(0, 1)
        x, z = xz.chunk(2, dim=1)
        fwd = (self.conv1d, self.x_proj, self.dt_proj)
        if self.bimamba == "v2":
            xb, zb = xz.flip(-1).chunk(2, dim=1)
            out = self._scan(x, z, *fwd, self.A_log, self.D, ops)
            out_b = self._scan(xb, zb, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b, ops)
            out = out + out_b.flip(-1)
            if self.divide_out:  # (out + out_b) / 2 through out_proj: the halving on the small weight, not the tokens
                return F.linear(out.transpose(1, 2), self.out_proj.weight * 0.5)
        elif self.bimamba == "v1":  # the backward scan reuses the forward conv output, flipped
            conv_out = ops.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
            out = self._scan(x, z, *fwd, self.A_log, self.D, ops, conv_out=conv_out)
            out_b = self._scan(None, z.flip(-1), *fwd, self.A_b_log, self.D, ops, conv_out=conv_out.flip(-1))
            out = out + out_b.flip(-1)
        else:
            out = self._scan(x, z, *fwd, self.A_log, self.D, ops)
        return F.linear(out.transpose(1, 2), self.out_proj.weight)


def drop_path_scale(x, drop_path: nn.Module) -> torch.Tensor | None:
    """The factor a sample that timm's DropPath module would multiply x by (its draws, in x's dtype), or None where
    it is off: the norm after it applies the factors, so that the multiply costs no pass of its own."""
    if not isinstance(drop_path, DropPath) or not drop_path.training or drop_path.drop_prob == 0:
        return None
    keep = 1 - drop_path.drop_prob
    scale = x.new_empty(x.shape[0]).bernoulli_(keep)
    return scale.div_(keep) if keep > 0 and drop_path.scale_by_keep else scale


def _stacked_pairs(*pairs):
    """Each (forward, backward) pair of parameters stacked, (2, *shape), as views of one concatenation: one kernel
    a mixer, not one a pair (each a few microseconds of a CUDA-graphed step)."""
    flat = torch.cat([t.reshape(-1) for pair in pairs for t in pair])
    sizes = [2 * first.numel() for first, _ in pairs]
    return [part.view(2, *first.shape) for part, (first, _) in zip(flat.split(sizes), pairs)]


class RMSNorm(nn.Module):
    """Weight-only RMSNorm; the computation (with the fused residual add) lives in vimexp.ops."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Block(nn.Module):
    """Add -> RMSNorm -> mixer. Carries the residual stream separately, in fp32, as the official fused kernels do."""

    def __init__(self, dim, mixer, drop_path=0.0, eps=1e-5):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(dim, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden, residual=None):
        hidden, residual = self.mixer.backend.ops.rms_norm(
            hidden, self.norm.weight, None, residual=residual, eps=self.norm.eps, prenorm=True, residual_in_fp32=True,
            x_scale=drop_path_scale(hidden, self.drop_path) if residual is not None else None)
        return self.mixer(hidden), residual


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if any(s < patch_size or (s - patch_size) % stride for s in self.img_size):
            fit = max((img_size if isinstance(img_size, int) else self.img_size[0]) - patch_size, 0) // stride * stride
            raise VimexpError(f"img_size {img_size} is not covered by patches of {patch_size} px every {stride} px "
                              f"(the last pixels would be cropped): use img_size={fit + patch_size} or "
                              f"{fit + patch_size + stride}")
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x):
        if tuple(x.shape[-2:]) != self.img_size:
            raise VimexpError(f"input is {tuple(x.shape[-2:])} px but the model was built for {self.img_size}: "
                              "create it with img_size=... (load_checkpoint adapts pos_embed)")
        p = self.proj.kernel_size
        if self.proj.stride != p:
            return self.proj(x).flatten(2).transpose(1, 2)
        # patches that tile the image, as one GEMM: cuDNN's kernel for this convolution took 0.90 ms of a Vim-Ti batch
        # at 1248 px (batch 8, bf16), the GEMM 0.24 ms (H200; docs/optimisation.md step 41)
        if torch.is_autocast_enabled(x.device.type):  # permute the half-precision copy autocast makes anyway
            x = x.to(torch.get_autocast_dtype(x.device.type))
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p[0], p[0], w // p[1], p[1]).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


def resample_grid(rows: torch.Tensor, grid_size) -> torch.Tensor:
    """(1, side * side, D) position rows of a square patch grid, resampled bicubically to grid_size: (1, H * W, D).
    Computed in float32 at least (bf16 / fp16 go up, float64 stays exact)."""
    side = round(math.sqrt(rows.shape[1]))
    grid = rows.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.to(torch.promote_types(grid.dtype, torch.float32)), size=tuple(grid_size),
                         mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(1, 2).to(rows.dtype)


ROPE_PT_GRID = 14  # the official pt_hw_seq_len: the 14 x 14 grid of 224 px pretraining with 16 px patches


def rope_angles(dim: int, grid: tuple[int, int], pt_grid: int = ROPE_PT_GRID, theta: float = 10000.0) -> torch.Tensor:
    """(cells, dim) float64 angles of the official 2-D RoPE: the first half of the channels turn with the row, the
    second with the column, positions squeezed onto the pt_grid-wide pretraining grid (i * pt_grid / side);
    frequencies theta^(-2k / (dim/2)), each shared by an adjacent channel pair; cells row-major."""
    half = dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)

    def axis(side):  # (side, half)
        return (torch.arange(side, dtype=torch.float64)[:, None] * pt_grid / side * freqs).repeat_interleave(2, 1)

    gh, gw = grid
    rows, cols = axis(gh)[:, None].expand(gh, gw, half), axis(gw)[None].expand(gh, gw, half)
    return torch.cat([rows, cols], -1).reshape(gh * gw, dim)


def rotate_pairs(x, cos, sin):
    """x cos + rotate_half(x) sin, rotate_half turning each channel pair (a, b) into (-b, a). Float32 tables
    promote bf16 tokens to float32, as in the official code."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-b, a), -1).flatten(-2) * sin


class Rope(nn.Module):
    """The official rotary position embedding of the patch grid (docs/official_impl.md §1.10). cos and sin are
    non-persistent buffers: derived from the config, so the state dict keeps the official layout of the released
    models and a checkpoint loads at any grid (the official RoPE models also saved rope.freqs_cos/sin, which its
    dense loaders drop)."""

    def __init__(self, dim: int, grid: tuple[int, int], pt_grid: int = ROPE_PT_GRID, theta: float = 10000.0):
        super().__init__()
        if dim % 4:
            raise VimexpError(f"RoPE turns channel pairs by row and by column: embed_dim must be a multiple of 4, "
                              f"got {dim}")
        self.dim, self.grid, self.pt_grid, self.theta = dim, tuple(grid), pt_grid, theta
        angles, dtype = rope_angles(dim, self.grid, pt_grid, theta), torch.get_default_dtype()
        self.register_buffer("freqs_cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("freqs_sin", angles.sin().to(dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        """Casts and moves re-derive the tables from float64: exact after .double(), correctly rounded in bf16."""
        super()._apply(fn, recurse)
        angles = rope_angles(self.dim, self.grid, self.pt_grid, self.theta).to(self.freqs_cos.device)
        self.freqs_cos, self.freqs_sin = angles.cos().to(self.freqs_cos.dtype), angles.sin().to(self.freqs_sin.dtype)
        return self

    def forward(self, x):
        """Rotate the patch tokens of x (batch, L, D). The official rule, by length: L = cells rotates every token;
        an odd L leaves the first alone (a head class token; with the released middle one, the patches before it
        take their predecessor's cell and the class token the cell before it). Where the official code would fail on
        a table that doesn't fit, the same rule by count: one token more leaves the first alone (odd grids), two
        (pool='double') both ends."""
        cells = self.freqs_cos.shape[0]
        if x.shape[1] == cells:
            return rotate_pairs(x, self.freqs_cos, self.freqs_sin)
        if x.shape[1] - cells not in (1, 2):
            raise VimexpError(f"RoPE has {cells} grid cells, the sequence {x.shape[1]} tokens: build the model for "
                              "this input size")
        inner = rotate_pairs(x[:, 1:cells + 1], self.freqs_cos, self.freqs_sin)
        return torch.cat([x[:, :1], inner, x[:, cells + 1:]], 1)


class VisionMamba(nn.Module):
    def __init__(self, img_size=224, patch_size=16, stride=16, depth=24, embed_dim=192, d_state=16, expand=2,
                 in_chans=3, num_classes=1000, drop_rate=0.0, drop_path_rate=0.1, norm_eps=1e-5,
                 bidirectional="ssm_conv", pool="middle", divide_out=True, flip_prob=0.5, kernel="auto",
                 recompute=False, rope=False, rope_residual=False, rope_pt_grid=ROPE_PT_GRID, rope_theta=10000.0):
        super().__init__()
        if rope_residual and not rope:
            raise VimexpError("rope_residual=True also turns the residual stream: it needs rope=True")
        if bidirectional not in BIDIRECTIONAL:
            raise VimexpError(f"unknown bidirectional strategy {bidirectional!r}: choose one of {', '.join(BIDIRECTIONAL)}")
        if pool not in POOLS:
            raise VimexpError(f"unknown pool {pool!r}: choose one of {', '.join(POOLS)}")
        bimamba, self.flip_sequence, self.paired_blocks = BIDIRECTIONAL[bidirectional]
        if self.paired_blocks and depth % 2:
            raise VimexpError(f"bidirectional='block' pairs layers: depth must be even, got {depth}")
        self.backend = kernel if isinstance(kernel, KernelBackend) else backend(kernel)
        self.pool, self.flip_prob, self.num_classes, self.embed_dim = pool, flip_prob, num_classes, embed_dim
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.num_cls_tokens = {"head": 1, "middle": 1, "double": 2}.get(pool, 0)
        if pool == "double":
            self.cls_token_head = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.cls_token_tail = nn.Parameter(torch.zeros(1, 1, embed_dim))
        elif self.num_cls_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_cls_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # the model's own grid: the official seg/det pass img_size // patch_size, the same for stride = patch
        self.rope = Rope(embed_dim, self.patch_embed.grid_size, rope_pt_grid, rope_theta) if rope else None
        self.rope_residual = rope_residual

        # block i drops the mixer output of block i-1, so mixer k is dropped at dpr[k] (the last one before norm_f)
        dpr = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList(
            Block(embed_dim, VimMixer(embed_dim, d_state, expand=expand, bimamba=bimamba, divide_out=divide_out,
                                      kernel=self.backend, recompute=recompute),
                  dpr[i], norm_eps)
            for i in range(depth))
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, norm_eps)
        reduction = self.patch_embed.img_size[0] // self.patch_embed.grid_size[0]
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self._init_weights(depth)

    @property
    def kernel(self) -> str:
        return self.backend.name

    def _init_weights(self, depth):
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
        for name in ("pos_embed", "cls_token", "cls_token_head", "cls_token_tail"):
            if hasattr(self, name):
                trunc_normal_(getattr(self, name), std=0.02)
        for module in self.modules():  # GPT-2 / Mamba style: zero biases (but dt_proj's), rescale out_proj
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            if isinstance(module, VimMixer):
                nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.out_proj.weight /= math.sqrt(depth)

    # ----- token layout
    def cls_positions(self, num_patches=None) -> list[int]:
        """Sequence indices of the class token(s) for a sequence of `num_patches` patches."""
        return cls_token_positions(self.pool, self.patch_embed.num_patches if num_patches is None else num_patches)

    def _tokens(self, x):
        x = self.patch_embed(x)
        batch, m = x.shape[:2]
        if self.pool == "double":
            x = torch.cat([self.cls_token_head.expand(batch, -1, -1), x, self.cls_token_tail.expand(batch, -1, -1)], 1)
        elif self.pool == "head":
            x = torch.cat([self.cls_token.expand(batch, -1, -1), x], 1)
        elif self.pool == "middle":
            x = torch.cat([x[:, : m // 2], self.cls_token.expand(batch, -1, -1), x[:, m // 2:]], 1)
        return self.pos_drop(x + self.pos_embed)

    def _run_layers(self, x, out_indices=(), feature="residual_plus_hidden"):
        """Run the blocks; returns (final normed tokens, {index: token state after that block}). The state after a
        block is the residual stream the next one starts from, as the official use_residual_as_feature reads it
        (with RoPE: turned as that block sees it); after the last block, residual + mixer output. feature='hidden'
        takes the block's mixer output instead (use_residual_as_feature=False, the official Vim-Ti UperNet)."""
        if feature not in FEATURES:
            raise VimexpError(f"unknown feature {feature!r}: choose one of {', '.join(FEATURES)}")
        states = out_indices if feature == "residual_plus_hidden" else ()
        flip = self.flip_sequence and self.training and torch.rand(()).item() < self.flip_prob
        if flip:  # 'sequence' strategy: the whole sequence reversed, as data augmentation
            x = x.flip(1)
        hidden, residual, taken, done = x, None, {}, range(0)
        step = 2 if self.paired_blocks else 1
        for i in range(0, len(self.layers), step):
            if self.rope is not None:  # before every layer (pair)
                hidden, residual = self._rotate(hidden, residual, flip)
            taken.update({k: self._state(hidden, residual, flip) for k in done if k in states})
            if self.paired_blocks:  # 'block' strategy: layer 2i reads forward, layer 2i+1 backward, then summed
                h_f, r_f = self.layers[i](hidden, residual)
                h_b, r_b = self.layers[i + 1](hidden.flip(1), None if residual is None else residual.flip(1))
                hidden, residual = h_f + h_b.flip(1), r_f + r_b.flip(1)
            else:
                hidden, residual = self.layers[i](hidden, residual)
            done = range(i, i + step)
            if feature == "hidden":  # before the next layer's RoPE, as the official code collects it
                taken.update({k: hidden.flip(1) if flip else hidden for k in done if k in out_indices})
        taken.update({k: self._state(hidden, residual, flip) for k in done if k in states})
        x = self.backend.ops.rms_norm(hidden, self.norm_f.weight, None, residual=residual, eps=self.norm_f.eps,
                                      prenorm=False, residual_in_fp32=True,
                                      x_scale=drop_path_scale(hidden, self.drop_path))
        return (x.flip(1) if flip else x), taken

    def _rotate(self, hidden, residual, flip):
        """RoPE before a layer: the hidden states and, with rope_residual, the residual stream (from the second layer
        on), always in patch order (a 'sequence' flip undone around it). It acts between layers, outside the mixer,
        so every kernel path (torch, cuda, fused) runs it alike."""
        rope = (lambda t: self.rope(t.flip(1)).flip(1)) if flip else self.rope
        if self.rope_residual and residual is not None:
            residual = rope(residual)
        return rope(hidden), residual

    @staticmethod
    def _state(hidden, residual, flip):
        state = residual + hidden
        return state.flip(1) if flip else state

    # ----- timm-style interface
    def forward_features(self, x):
        """Pooled features (batch, D); with pool='max' all tokens (batch, L, D), max-pooled after the head."""
        return self._pool(self._run_layers(self._tokens(x))[0])

    def _pool(self, x):
        if self.pool in ("head", "middle"):
            return x[:, self.cls_positions()[0]]
        if self.pool == "double":
            return (x[:, 0] + x[:, -1]) / 2
        return x.mean(1) if self.pool == "mean" else x

    def forward_head(self, x):
        x = self.head(x)
        return x.amax(1) if self.pool == "max" else x

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices: int | list[int] | None = None, intermediates_only: bool = False,
                              feature: str = "residual_plus_hidden"):
        """timm's interface for dense necks: the token states (residual + mixer output; with RoPE as the next layer
        sees them, see _run_layers; feature='hidden': the mixer output alone) after the layers in `indices` (an int n:
        the last n), class tokens removed, as (batch, D, H, W) maps; with the final features (as forward_features)
        first unless `intermediates_only`."""
        depth = len(self.layers)
        indices = list(range(depth - indices, depth)) if isinstance(indices, int) else \
            list(range(depth)) if indices is None else [i % depth for i in indices]
        final, taken = self._run_layers(self._tokens(x), out_indices=set(indices), feature=feature)
        keep = [i for i in range(self.pos_embed.shape[1]) if i not in self.cls_positions()]
        gh, gw = self.patch_embed.grid_size
        maps = [taken[i][:, keep].transpose(1, 2).reshape(x.shape[0], -1, gh, gw) for i in indices]
        return maps if intermediates_only else (self._pool(final), maps)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "cls_token_head", "cls_token_tail"}

    @torch.jit.ignore
    def group_matcher(self, coarse=False):
        """Layer ids for timm's layer-wise lr decay: embeddings 0, block i -> i + 1, norm_f and head last."""
        return dict(stem=r"^cls_token|^cls_token_head|^cls_token_tail|^pos_embed|^patch_embed",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])

    def resample_pos_embed(self, pos_embed: torch.Tensor, src_pool: str | None = None) -> torch.Tensor:
        """Fit a checkpoint's pos_embed (any square grid, class tokens laid out as for `src_pool`, by default this
        model's) to this model: interpolate the patch grid bicubically, keep each class-token row where this layout
        puts it, and drop the source's class-token rows if this model has none (a segmentation backbone from a
        middle-class-token checkpoint). The official loaders take the first rows as the class rows whatever the
        layout: `vimexp.models.checkpoint.front_token_pos_embed`, load_checkpoint(pos_embed_mode='official')."""
        src_pool = src_pool or self.pool
        if pos_embed.shape == self.pos_embed.shape and src_pool == self.pool:
            return pos_embed
        src_n = {"head": 1, "middle": 1, "double": 2}.get(src_pool, 0)
        src_m = pos_embed.shape[1] - src_n
        side = int(round(math.sqrt(src_m)))
        if side * side != src_m:
            raise VimexpError(f"checkpoint pos_embed has {pos_embed.shape[1]} rows: not a square grid plus "
                              f"{src_n} class token(s) of pool={src_pool!r}")
        if self.num_cls_tokens and src_n != self.num_cls_tokens:
            raise VimexpError(f"checkpoint has {src_n} class token(s), this model (pool={self.pool!r}) needs "
                              f"{self.num_cls_tokens}: build the model with the checkpoint's pool")
        src_cls = cls_token_positions(src_pool, src_m)
        grid_rows = [i for i in range(pos_embed.shape[1]) if i not in src_cls]
        out = list(resample_grid(pos_embed[:, grid_rows], self.patch_embed.grid_size).unbind(1))
        if self.num_cls_tokens:
            for pos, src in zip(self.cls_positions(), src_cls):  # ascending positions: insert in order
                out.insert(pos, pos_embed[:, src])
        return torch.stack(out, 1)
