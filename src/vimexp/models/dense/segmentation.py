"""Semantic segmentation models on a plain backbone, in plain PyTorch: UperNet (PPM + FPN, as MMSeg's UPerHead) with
the auxiliary FCN head on the simple feature pyramid (Table 2), and a Segmenter mask-transformer decoder (Table 4)."""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from vimexp import VimexpError
from vimexp.models.backbone import intermediate_maps
from vimexp.models.dense.necks import SimpleFeaturePyramid


def conv_bn_relu(cin: int, cout: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class UperNetHead(nn.Module):
    """Pyramid pooling on the coarsest map, top-down FPN fusion, all levels concatenated at the finest stride."""

    def __init__(self, in_channels: list[int], channels: int, num_classes: int, pool_scales=(1, 2, 3, 6),
                 dropout: float = 0.1):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels))
                                 for s in pool_scales)
        self.ppm_bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = maps[-1]
        top = self.ppm_bottleneck(torch.cat([top, *(_resize(pool(top), top) for pool in self.ppm)], 1))
        laterals = [conv(m) for conv, m in zip(self.lateral, maps)] + [top]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals)] + [top]
        return self.classifier(self.fuse(torch.cat([outs[0], *(_resize(o, outs[0]) for o in outs[1:])], 1)))


class FCNHead(nn.Module):
    """The auxiliary head: convs on one pyramid level, then a 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        convs = [conv_bn_relu(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x))


class SegmenterHead(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021): one learned embedding per class joins the patch tokens of the
    last map through `depth` transformer blocks; each class's mask is the scalar product of the L2-normalised patch
    and class embeddings, then a LayerNorm over classes."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 2, num_heads: int | None = None,
                 drop_path: float = 0.0):
        super().__init__()
        dim = in_channels
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads or max(dim // 64, 1), drop_path=drop_path)
                                      for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Linear(dim, dim, bias=False)
        self.proj_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, dim, H, W) -> (batch, classes, H, W)
        batch, dim, h, w = x.shape
        tokens = torch.cat([x.flatten(2).transpose(1, 2), self.cls_emb.expand(batch, -1, -1)], 1)
        tokens = self.norm(self.blocks(tokens))
        patches = F.normalize(self.proj_patch(tokens[:, :h * w]), dim=-1)
        classes = F.normalize(self.proj_classes(tokens[:, h * w:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (batch, H*W, classes)
        return masks.transpose(1, 2).reshape(batch, -1, h, w)


class SegmentationModel(nn.Module):
    """Backbone -> simple feature pyramid -> UperNet + auxiliary FCN (Table 2), or the last layer's map -> Segmenter's
    mask transformer (Table 4)."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "upernet", out_indices=(5, 11, 17, 23),
                 channels: int = 192, aux_channels: int = 256, aux_convs: int = 1, aux_index: int = 2,
                 segmenter_depth: int = 2, feature: str | None = None):
        super().__init__()
        self.backbone, self.decoder, self.out_indices, self.aux_index = backbone, decoder, tuple(out_indices), aux_index
        self.feature = feature
        if feature is not None and "feature" not in inspect.signature(backbone.forward_intermediates).parameters:
            raise VimexpError(f"task.feature={feature} needs a backbone that can choose its features (Vim); "
                              f"{type(backbone).__name__} has one kind: set task.feature=null")
        dim = backbone.embed_dim
        if decoder == "upernet":
            self.neck = SimpleFeaturePyramid(dim)
            self.decode_head = UperNetHead([dim] * 4, channels, num_classes)
            self.aux_head = FCNHead(dim, aux_channels, num_classes, aux_convs) if aux_channels else None
        elif decoder == "segmenter":
            self.decode_head = SegmenterHead(dim, num_classes, depth=segmenter_depth)
            self.aux_head = None
        else:
            raise VimexpError(f"unknown decoder {decoder!r}: choose upernet or segmenter")

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at the decoder's stride (4 for UperNet, 16 for Segmenter), and the auxiliary head's (or None)."""
        if self.decoder == "segmenter":
            return self.decode_head(self._maps(x, self.out_indices[-1:])[0]), None
        maps = self.neck(self._maps(x, self.out_indices))
        aux = self.aux_head(maps[self.aux_index]) if self.aux_head is not None and self.training else None
        return self.decode_head(maps), aux

    def _maps(self, x, indices) -> list[torch.Tensor]:
        if self.feature is None:  # the backbone's own kind of feature
            return intermediate_maps(self.backbone, x, indices)
        return self.backbone.forward_intermediates(x, indices=list(indices), intermediates_only=True,
                                                   feature=self.feature)
