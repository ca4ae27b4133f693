"""Hier-Vim (the paper's Appendix C): Swin Transformer's four stages, with each shifted-window attention replaced by
Vim's bidirectional SSM over the whole stage; and Swin itself (timm) as its baseline.

The paper gives the stages (blocks, widths) and parameter counts only; what it leaves open is an option here:
  - block: Swin's, x + mixer(LayerNorm(x)) then x + MLP(LayerNorm(x)) with GELU, but `mlp_ratio` 3.5, not Swin's 4:
    the SSM mixer has about 2.5 d^2 more weights than window attention, and the paper's counts (30 / 50 / 89M) sit
    near Swin's (28 / 50 / 88M). With ratio 4 Hier-Vim would have 32.4 / 54.6 / 96.0M (+8%); with 3.5 it has
    30.4 / 51.2 / 89.8M (+1.2 / +2.3 / +0.9%);
  - mixer: `VimMixer` (bimamba v2, d_state 16, expand 2) over the stage's tokens in raster order (row by row; the
    backward branch reads them in reverse), on the cuda or torch kernels like Vim;
  - both scan directions start from Mamba's dt initialisation (dt in [0.001, 0.1]). The official Vim init zeroes the
    backward branch's dt bias (dt = 0.69): its backward scan then forgets within a few dozen tokens, which on a
    3136-token stage would leave the SSM nearly one-directional;
  - no position embedding, as Swin (ape=False): the causal conv and the scan see the order;
  - patch partition 4x4 + LayerNorm and Swin's patch merging between stages; classification by LayerNorm, global
    average pooling and a linear head, as Swin.
"""
import timm
import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging

from vimexp.models.registry import register_model
from vimexp.models.vim import VimMixer
from vimexp.ops import KernelBackend, backend


class HierVimBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=3.5, drop_path=0.0, **mixer):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = VimMixer(dim, **mixer)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):  # (batch, tokens, dim)
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class HierVimStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):  # (batch, H, W, dim) in and out; the blocks see the map flattened row by row
        x = self.downsample(x)
        batch, height, width, dim = x.shape
        return self.blocks(x.reshape(batch, height * width, dim)).view(batch, height, width, dim)


class HierVim(nn.Module):
    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 5, 2),
                 mlp_ratio=3.5, drop_path_rate=0.2, d_state=16, expand=2, bimamba="v2", kernel="auto", recompute=False):
        super().__init__()
        self.backend = kernel if isinstance(kernel, KernelBackend) else backend(kernel)
        self.num_classes = num_classes
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm,
                                      output_fmt="NHWC")
        dpr = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
        mixer = dict(d_state=d_state, expand=expand, bimamba=bimamba, kernel=self.backend, recompute=recompute)
        self.stages = nn.Sequential(*(
            HierVimStage(PatchMerging(dims[i - 1], dims[i]) if i else nn.Identity(),
                         [HierVimBlock(dims[i], mlp_ratio, next(dpr), **mixer) for _ in range(depth)])
            for i, depth in enumerate(depths)))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():
            if isinstance(module, VimMixer) and module.bimamba == "v2":
                module._init_dt(module.dt_proj_b, dt_min=0.001, dt_max=0.1, floor=1e-4)
        self.apply(self._init_weights)

    @property
    def kernel(self) -> str:
        return self.backend.name

    @staticmethod
    def _init_weights(module):  # Swin's init, but the mixer's dt_proj keeps Mamba's (its bias sets the initial dt)
        if isinstance(module, nn.Linear) and not getattr(module.bias, "_no_reinit", False):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward_features(self, x):
        return self.norm(self.stages(self.patch_embed(x)))

    def forward_head(self, x):
        return self.head(x.mean(dim=(1, 2)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model
def hier_vim_t(**kwargs):
    return HierVim(**{"embed_dim": 96, "depths": (2, 2, 5, 2), **kwargs})


@register_model
def hier_vim_s(**kwargs):
    return HierVim(**{"embed_dim": 96, "depths": (2, 2, 15, 2), **kwargs})


@register_model
def hier_vim_b(**kwargs):
    return HierVim(**{"embed_dim": 128, "depths": (2, 2, 15, 2), **kwargs})


@register_model
def hier_vim_nano(**kwargs):
    """Hier-Vim for the built-in 32 px data: 4x4 patches, 4 stages of width 16-128 (8 x 8 tokens down to 1 x 1)."""
    return HierVim(**{"img_size": 32, "patch_size": 4, "embed_dim": 16, "depths": (1, 1, 2, 1), **kwargs})


def _swin(timm_name, **kwargs):
    return timm.create_model(timm_name, pretrained=False, **kwargs)


@register_model
def swin_t(**kwargs):
    return _swin("swin_tiny_patch4_window7_224", **kwargs)


@register_model
def swin_s(**kwargs):
    return _swin("swin_small_patch4_window7_224", **kwargs)


@register_model
def swin_b(**kwargs):
    return _swin("swin_base_patch4_window12_384", **{"img_size": 224, "window_size": 7, **kwargs})


@register_model
def swin_nano(**kwargs):
    """Swin the size of hier_vim_nano: 4x4 patches on 32 px, windows of 4 x 4 tokens."""
    return _swin("swin_tiny_patch4_window7_224", **{"img_size": 32, "patch_size": 4, "embed_dim": 16,
                                                    "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8),
                                                    "window_size": 4, **kwargs})
