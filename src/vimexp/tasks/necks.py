"""Multi-scale features from a plain (single-scale) backbone, shared by the segmentation and detection tasks.

`SimpleFeaturePyramid` is the BEiT / ViTDet "simple FPN" of the official Vim segmentation code: the stride-16 token
maps of four layers become strides 4 (two 2x transposed convs), 8 (one), 16 (as is) and 32 (2x max pool).
"""
import torch
import torch.nn as nn


def intermediate_maps(backbone: nn.Module, x: torch.Tensor, indices) -> list[torch.Tensor]:
    """(batch, D, H/16, W/16) token maps after the blocks in `indices`, class tokens removed, for Vim or timm ViTs."""
    if hasattr(backbone, "patch_embed") and hasattr(backbone, "layers"):  # vimexp VisionMamba
        return backbone.forward_intermediates(x, indices)
    return backbone.forward_intermediates(x, indices=list(indices), intermediates_only=True)  # timm


class SimpleFeaturePyramid(nn.Module):
    def __init__(self, embed_dim: int, norm=nn.BatchNorm2d):
        super().__init__()
        up = lambda: nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)  # noqa: E731
        self.fpn1 = nn.Sequential(up(), norm(embed_dim), nn.GELU(), up())
        self.fpn2 = up()
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [fpn(m) for fpn, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class PyramidBackbone(nn.Module):
    """Backbone + simple feature pyramid: image -> four maps at strides 4, 8, 16, 32."""

    def __init__(self, backbone: nn.Module, out_indices=(5, 11, 17, 23)):
        super().__init__()
        self.backbone, self.out_indices = backbone, tuple(out_indices)
        self.neck = SimpleFeaturePyramid(backbone.embed_dim)

    def forward(self, x):
        return self.neck(intermediate_maps(self.backbone, x, self.out_indices))
