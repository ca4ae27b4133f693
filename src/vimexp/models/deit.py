"""DeiT baselines from timm behind the registry, with a switch between eager and fused (SDPA) attention, and their
ViTDet form (window attention) for detection."""
from functools import partial

import timm
import torch.nn as nn
from timm.models.vision_transformer import Attention
from timm.models.vision_transformer_sam import VisionTransformerSAM

from vimexp import VimexpError
from vimexp.models.registry import register_model


def _deit(timm_name, attn="sdpa", **kwargs):
    if attn not in ("eager", "sdpa"):
        raise VimexpError(f"unknown attn {attn!r}: choose eager (the paper's setting) or sdpa")
    model = timm.create_model(timm_name, pretrained=False, **kwargs)
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = attn == "sdpa"
    return model


@register_model
def deit_ti(**kwargs):
    return _deit("deit_tiny_patch16_224", **kwargs)


@register_model
def deit_s(**kwargs):
    return _deit("deit_small_patch16_224", **kwargs)


@register_model
def deit_b(**kwargs):
    return _deit("deit_base_patch16_224", **kwargs)


@register_model
def deit_nano(**kwargs):
    """A DeiT the size of vim_nano's input, for CPU comparisons on the built-in dataset."""
    return _deit("vit_tiny_patch16_224", **{"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6,
                                           "num_heads": 3, **kwargs})


def _vitdet(embed_dim: int, depth: int, num_heads: int, global_attn_indexes, img_size=1024, patch_size=16,
            window_size=14, drop_path_rate=0.1, num_classes=0, **kwargs):
    """ViTDet's plain ViT for detection (timm's SAM encoder, which is ViTDet's): window attention in every block but
    `global_attn_indexes`, absolute position embedding on the patch grid (no class token), no relative position
    bias, and no final norm: the feature pyramid takes the last block's output. LayerNorm eps 1e-6, as ViTDet's."""
    model = VisionTransformerSAM(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, window_size=window_size, global_attn_indexes=tuple(global_attn_indexes),
                                 use_rel_pos=False, neck_chans=0, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                 **{"norm_layer": partial(nn.LayerNorm, eps=1e-6), **kwargs})
    model.neck = nn.Identity()
    return model


@register_model
def deit_ti_vitdet(**kwargs):
    """DeiT-Ti as the official Vim-Det baseline (cascade_mask_rcnn_vitdet_t_100ep): 12 blocks, global attention in
    blocks 2, 5, 8, 11, 14 x 14 windows elsewhere."""
    return _vitdet(**{"embed_dim": 192, "depth": 12, "num_heads": 3, "global_attn_indexes": (2, 5, 8, 11), **kwargs})


@register_model
def deit_nano_vitdet(**kwargs):
    """deit_nano's ViTDet form for the built-in detection data: 8 px patches, 4x4 windows, global blocks 1 and 3."""
    return _vitdet(**{"embed_dim": 96, "depth": 4, "num_heads": 3, "global_attn_indexes": (1, 3), "patch_size": 8,
                      "window_size": 4, **kwargs})
