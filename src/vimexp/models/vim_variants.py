"""Registered Vim variants: the released configurations (hustvl/Vim) and a small one for CPU runs."""
from timm.models import register_model as timm_register_model

from vimexp import VimexpError
from vimexp.models.registry import create_model, register_model
from vimexp.models.vim import VisionMamba

NO_CLASS_TOKEN = {"pool": "mean"}  # the official dense backbones: if_cls_token=False


def _vim(embed_dim, stride=16, **kwargs):
    """The released layout (patch 16, 24 layers); keyword overrides win, including embed_dim and stride."""
    return VisionMamba(**{"patch_size": 16, "stride": stride, "depth": 24, "embed_dim": embed_dim, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_ti(**kwargs):
    return _vim(**{"embed_dim": 192, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_s(**kwargs):
    return _vim(**{"embed_dim": 384, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_b(**kwargs):
    return _vim(**{"embed_dim": 768, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_ti_stride8(**kwargs):
    return _vim(**{"embed_dim": 192, "stride": 8, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_s_stride8(**kwargs):
    return _vim(**{"embed_dim": 384, "stride": 8, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_b_stride8(**kwargs):
    return _vim(**{"embed_dim": 768, "stride": 8, **kwargs})


@register_model(dense=NO_CLASS_TOKEN)
def vim_nano(**kwargs):
    """A few-minute CPU model for the built-in 32 px dataset: a 4x4 grid of 8 px patches, 4 layers of width 48."""
    return VisionMamba(**{"img_size": 32, "patch_size": 8, "stride": 8, "depth": 4, "embed_dim": 48,
                          "drop_path_rate": 0.0, **kwargs})


# timm's names for the released variants, registered with timm: `timm.create_model("vim_small_patch16_224")` after
# `import vimexp.models`, and `timm.list_models("vim*")`. No weights can be downloaded; load the released files with
# vimexp.models.load_checkpoint (pos_embed fitted to the model).
TIMM_NAMES = {"vim_tiny_patch16_224": "vim_ti", "vim_small_patch16_224": "vim_s", "vim_base_patch16_224": "vim_b",
              "vim_tiny_patch16_stride8_224": "vim_ti_stride8", "vim_small_patch16_stride8_224": "vim_s_stride8",
              "vim_base_patch16_stride8_224": "vim_b_stride8"}


def _register_with_timm(timm_name: str, ours: str):
    def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        if pretrained:
            raise VimexpError(f"{timm_name}: there are no weights to download; create it with pretrained=False and "
                              "load the released file with vimexp.models.load_checkpoint(model, path)")
        return create_model(ours, **kwargs)
    entry.__name__ = entry.__qualname__ = timm_name
    entry.__doc__ = f"vimexp's {ours} under timm's naming."
    timm_register_model(entry)


for _timm_name, _ours in TIMM_NAMES.items():
    _register_with_timm(_timm_name, _ours)
