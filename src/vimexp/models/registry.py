"""Models by name, timm style: each variant is a small registered function over one configurable class."""
from pathlib import Path
from typing import Callable

from timm.models import get_pretrained_cfg

from vimexp import VimexpError
from vimexp.models.checkpoint import load_pretrained

_MODELS: dict[str, Callable] = {}
_DENSE: dict[str, dict] = {}  # constructor arguments of a model's dense-task form
_ALIASES: dict[str, str] = {}  # timm's and the official names -> the name here
_TIMM: dict[str, str] = {}  # name -> its timm name, whose pretrained_cfg says where the released weights are


def register_model(fn: Callable | None = None, *, dense: dict | None = None):
    """Register `fn` under its name; `dense` holds the arguments its dense-task backbone is built with
    (`@register_model(dense={"pool": "mean"})`: no class token)."""
    def register(fn: Callable) -> Callable:
        _MODELS[fn.__name__] = fn
        _DENSE[fn.__name__] = dense or {}
        return fn
    return register(fn) if fn is not None else register


def register_timm_names(name: str, timm_name: str, *aliases: str):
    """`name` is `timm_name` in timm's registry (whose pretrained_cfg names the released weights), or `aliases`."""
    _TIMM[name] = timm_name
    _ALIASES.update(dict.fromkeys((timm_name, *aliases), name))


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, dense: bool = False, pretrained: bool | str | Path = False, **overrides):
    """Build a registered model (or one of its timm / official names); keyword overrides (img_size, num_classes,
    drop_path_rate, kernel, ...) win, except over the family's dense form when `dense`. `pretrained`: True for the
    released weights (the file its timm pretrained_cfg names, from the Hugging Face cache or hub), or a checkpoint path;
    pos_embed is fitted to the model, the head skipped when num_classes differs from the release's."""
    name = _ALIASES.get(name, name)
    if name not in _MODELS:
        raise VimexpError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    model = _MODELS[name](**{**overrides, **(_DENSE[name] if dense else {})})
    return load_pretrained(model, _pretrained_cfg(name), pretrained) if pretrained else model


def _pretrained_cfg(name: str) -> dict:
    cfg = get_pretrained_cfg(_TIMM[name]) if name in _TIMM else None
    return cfg.to_dict() if cfg else {"architecture": name}
