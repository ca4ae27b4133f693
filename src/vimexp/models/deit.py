"""DeiT baselines from timm behind the registry, with a switch between eager and fused (SDPA) attention."""
import timm
from timm.models.vision_transformer import Attention

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
