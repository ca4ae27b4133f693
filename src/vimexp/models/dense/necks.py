"""Multi-scale features from a plain (single-scale) backbone, for the segmentation and detection tasks.

`SimpleFeaturePyramid` is the BEiT / ViTDet "simple FPN" of the official Vim segmentation code: the stride-16 token
maps of four layers become strides 4 (two 2x transposed convs), 8 (one), 16 (as is) and 32 (2x max pool).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from vimexp.models.backbone import intermediate_maps


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


class ViTDetPyramid(nn.Module):
    """ViTDet's simple feature pyramid for detection: the backbone's last stride-s map alone -> strides s/4 (two 2x
    transposed convs), s/2, s, 2s (2x max pool), each through a 1x1 and a 3x3 conv to `channels` with LayerNorm, plus
    a 4s level max-pooled from the 2s one (detectron2's LastLevelMaxPool). Keys p2..p6 as for a stride-16 backbone."""

    def __init__(self, embed_dim: int, channels: int = 256):
        super().__init__()
        up = lambda i, o: nn.ConvTranspose2d(i, o, kernel_size=2, stride=2)  # noqa: E731
        d = embed_dim
        self.rescale = nn.ModuleList([nn.Sequential(up(d, d // 2), LayerNorm2d(d // 2), nn.GELU(), up(d // 2, d // 4)),
                                      up(d, d // 2), nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2)])
        self.project = nn.ModuleList(nn.Sequential(
            nn.Conv2d(i, channels, 1, bias=False), LayerNorm2d(channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), LayerNorm2d(channels)) for i in (d // 4, d // 2, d, d))

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = [project(rescale(x)) for rescale, project in zip(self.rescale, self.project)]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(("p2", "p3", "p4", "p5", "p6"), maps))
