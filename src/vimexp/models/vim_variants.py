"""Registered Vim variants: the released configurations (hustvl/Vim) and a small one for CPU runs."""
from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model as timm_register_model

from vimexp.models.checkpoint import load_pretrained
from vimexp.models.registry import create_model, register_model, register_timm_names
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


# The released variants under timm's names (the official names, from hustvl/Vim's models_mamba.py, are aliases), with
# pretrained_cfgs naming the released ImageNet-1k files: `timm.create_model("vim_tiny_patch16_224", pretrained=True)`
# after `import vimexp.models`. The stride-8 files are the fine-tuned ("+") ones; no stride-8 base was released.
_OFFICIAL = "vim_{}_bimambav2_final_pool_mean_abs_pos_embed_with_{}_div2"
RELEASES = {  # timm name: (vimexp name, official name, (Hugging Face repo, file) or None)
    "vim_tiny_patch16_224": ("vim_ti", _OFFICIAL.format("tiny_patch16_224", "midclstok"),
                             ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")),
    "vim_tiny_patch16_stride8_224": ("vim_ti_stride8", _OFFICIAL.format("tiny_patch16_stride8_224", "midclstok"),
                                     ("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth")),
    "vim_small_patch16_224": ("vim_s", _OFFICIAL.format("small_patch16_224", "midclstok"),
                              ("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")),
    "vim_small_patch16_stride8_224": ("vim_s_stride8", _OFFICIAL.format("small_patch16_stride8_224", "midclstok"),
                                      ("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth")),
    "vim_base_patch16_224": ("vim_b", _OFFICIAL.format("base_patch16_224", "middle_cls_token"),
                             ("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth")),
    "vim_base_patch16_stride8_224": ("vim_b_stride8", None, None),
}


def _cfg(weights):
    """A release's pretrained_cfg; preprocessing as the official evaluation (DeiT's: Resize 256 bicubic, CenterCrop
    224, ImageNet mean/std)."""
    repo, filename = weights or (None, None)
    return dict(hf_hub_id=repo, hf_hub_filename=filename, num_classes=1000, input_size=(3, 224, 224),
                fixed_input_size=True, crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head", license="apache-2.0",
                origin_url="https://github.com/hustvl/Vim", paper_ids="arXiv:2401.09417")


# read by timm's register_model: each name (alias included) finds its cfgs here, tagged `hustvl_in1k` with weights
default_cfgs = generate_default_cfgs({
    f"{name}.hustvl_in1k" if weights else name: _cfg(weights)
    for timm_name, (_, official, weights) in RELEASES.items() for name in (timm_name, official) if name})


def _register_with_timm(name: str, ours: str):
    def entry(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        # timm's own loader would take 'model_ema' before 'model' (the released accuracy is the raw model's), and its
        # download errors run over many lines: vimexp's loader reads the file the resolved cfg names
        model = build_model_with_cfg(partial(create_model, ours), name, pretrained=False, pretrained_cfg=pretrained_cfg,
                                     pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
        return load_pretrained(model, model.pretrained_cfg, cache_dir=cache_dir) if pretrained else model
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"vimexp's {ours} under timm's naming."
    timm_register_model(entry)


for _timm_name, (_ours, _official, _) in RELEASES.items():
    _names = [_timm_name, _official] if _official else [_timm_name]
    register_timm_names(_ours, *_names)
    for _name in _names:
        _register_with_timm(_name, _ours)
