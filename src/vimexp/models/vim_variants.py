"""Registered Vim variants: the released configurations (hustvl/Vim) and a small one for CPU runs."""
from vimexp.models.registry import register_model
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
