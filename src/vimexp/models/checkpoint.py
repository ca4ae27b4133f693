"""Load official Vim checkpoints, vimexp (Lightning) checkpoints and plain state dicts into a model."""
import argparse
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from vimexp import VimexpError


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise VimexpError(f"checkpoint {path} does not exist: check the path")
    try:  # official checkpoints pickle main.py's argparse.Namespace beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise VimexpError(f"checkpoint {path} can't be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
                          "is it a torch checkpoint, and complete?") from None


def extract_state_dict(ckpt: dict, use_ema: bool = False) -> dict:
    """The backbone weights of an official ({'model', 'model_ema'}), vimexp ({'state_dict'}) or plain checkpoint."""
    if "state_dict" in ckpt:  # vimexp: the LightningModule holds `model` and `ema.module`
        prefix = "ema.module." if use_ema else "model."
        sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    elif "model" in ckpt:
        sd = ckpt.get("model_ema") if use_ema else ckpt["model"]
    else:
        sd = None if use_ema else ckpt
    if not sd:
        raise VimexpError("checkpoint has no EMA weights: load it with use_ema=False" if use_ema
                          else "checkpoint holds no model weights")
    return sd


def adapt_pos_embed(model, sd: dict) -> dict:
    """Resample pos_embed to the model's grid (another resolution or stride), class tokens kept in place."""
    if "pos_embed" not in sd:
        return sd
    sd = dict(sd)
    if hasattr(model, "resample_pos_embed"):  # Vim: the checkpoint's class tokens, by its keys
        tokens = [k for k in ("cls_token", "cls_token_head", "cls_token_tail") if k in sd]
        src_pool = {0: "mean", 2: "double"}.get(len(tokens)) or (model.pool if model.num_cls_tokens == 1 else "middle")
        sd["pos_embed"] = model.resample_pos_embed(sd["pos_embed"], src_pool)
        for key in tokens:
            if not hasattr(model, key):  # a backbone without class token (segmentation) drops them
                del sd[key]
    elif sd["pos_embed"].shape == model.pos_embed.shape:
        return sd
    elif model.pos_embed.ndim == 4:  # ViTDet (1, H, W, D) from a classification ViT: prefix tokens and final norm go
        prefix = [k for k in ("cls_token", "dist_token") if k in sd]
        grid = list(model.pos_embed.shape[1:3])
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"][:, len(prefix):], grid, num_prefix_tokens=0
                                                 ).reshape(1, *grid, -1)
        for key in (*prefix, "norm.weight", "norm.bias"):
            sd.pop(key, None)
    else:  # timm ViT: prefix tokens in front
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=model.num_prefix_tokens)
    return sd


def check_compatible(model, sd: dict, ignore: tuple[str, ...] = ()):
    """Raise one line naming the first key that doesn't fit the model."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    for key, value in own.items():
        if key not in sd:
            raise VimexpError(f"checkpoint does not fit the model: key {key!r} is missing "
                              f"({len(set(own) - set(sd))} missing in all): was it saved from another model?")
        if tuple(sd[key].shape) != tuple(value.shape):
            raise VimexpError(f"checkpoint does not fit the model: {key!r} is {list(sd[key].shape)} in the checkpoint "
                              f"but {list(value.shape)} in the model: was it saved from another model?")
    extra = [k for k in sd if k not in own and not k.startswith(ignore)]
    if extra:
        raise VimexpError(f"checkpoint does not fit the model: unexpected key {extra[0]!r} "
                          f"({len(extra)} unexpected in all): was it saved from another model or variant?")


def load_checkpoint(model, path, use_ema: bool = False, ignore: tuple[str, ...] = ()):
    """Load weights into `model` in place; keys starting with a prefix in `ignore` (e.g. 'head.') are skipped."""
    sd = adapt_pos_embed(model, extract_state_dict(read_checkpoint(path), use_ema))
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)} if ignore else sd
    check_compatible(model, sd, ignore)
    model.load_state_dict(sd, strict=not ignore)
    return model
