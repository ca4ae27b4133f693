"""Models by name, timm style: each variant is a small registered function over one configurable class."""
from typing import Callable

from vimexp import VimexpError

_MODELS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **overrides):
    """Build a registered model; keyword overrides (img_size, num_classes, drop_path_rate, kernel, ...) win."""
    if name not in _MODELS:
        raise VimexpError(f"unknown model {name!r}: choose one of {', '.join(list_models())}")
    return _MODELS[name](**overrides)
