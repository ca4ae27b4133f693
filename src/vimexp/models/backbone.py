"""The one way every task gets its backbone, and the interface the tasks use on it.

Every registered backbone follows timm's interface: `feature_info` (one entry per layer, so its length is the depth),
`forward_intermediates(x, indices, intermediates_only=True)` (NCHW maps after those layers, class tokens removed),
`no_weight_decay()` and `group_matcher()`. Dense tasks build their backbone without classifier and, where the model
family says so (`register_model(dense=...)`), without class tokens, as the official dense configs do.
"""
import torch
import torch.nn as nn

from vimexp.models.checkpoint import load_checkpoint
from vimexp.models.registry import create_model


def build_backbone(model: dict, dense: bool = False, img_size: int | None = None) -> nn.Module:
    """The model of a `model` config (name, constructor overrides, `init_from` weights and `init_ignore` prefixes;
    a Vim's `init_pos_embed` and `init_src_pool`, see vimexp.models.checkpoint.load_checkpoint).
    dense: no classifier, the family's dense form (e.g. Vim without class token), built for `img_size` inputs; a
    classification checkpoint then loads without its head, pos_embed fitted to the new grid."""
    kwargs = dict(model)
    init_from, ignore = kwargs.pop("init_from", None), tuple(kwargs.pop("init_ignore", None) or ())
    how = dict(pos_embed_mode=kwargs.pop("init_pos_embed", None) or "correct",
               src_pool=kwargs.pop("init_src_pool", None))
    if dense:
        kwargs.update(num_classes=0, **({"img_size": img_size} if img_size else {}))
        ignore = ("head.", *ignore)
    net = create_model(**kwargs, dense=dense)
    if init_from:
        load_checkpoint(net, init_from, ignore=ignore, **how)
    return net


def num_layers(backbone: nn.Module) -> int:
    return len(backbone.feature_info)


def intermediate_maps(backbone: nn.Module, x: torch.Tensor, indices) -> list[torch.Tensor]:
    """(batch, D, H, W) token maps after the layers in `indices`, class tokens removed."""
    return backbone.forward_intermediates(x, indices=list(indices), intermediates_only=True)
