"""Models by name, timm style: each variant is a small registered function over one configurable class."""
from typing import Callable

from vimexp import VimexpError

_MODELS: dict[str, Callable] = {}
_DENSE: dict[str, dict] = {}  # constructor arguments of a model's dense-task form


def register_model(fn: Callable | None = None, *, dense: dict | None = None):
    """Register `fn` under its name; `dense` holds the arguments its dense-task backbone is built with
    (`@register_model(dense={"pool": "mean"})`: no class token)."""
    def register(fn: Callable) -> Callable:
        _MODELS[fn.__name__] = fn
        _DENSE[fn.__name__] = dense or {}
        return fn
    return register(fn) if fn is not None else register


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, dense: bool = False, **overrides):
    """Build a registered model; keyword overrides (img_size, num_classes, drop_path_rate, kernel, ...) win, except
    over the family's dense form when `dense`."""
    if name not in _MODELS:
        raise VimexpError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    return _MODELS[name](**{**overrides, **(_DENSE[name] if dense else {})})
