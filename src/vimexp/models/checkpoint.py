"""Load official Vim checkpoints, vimexp (Lightning) checkpoints and plain state dicts into a model.

A Vim checkpoint's class-token layout comes from the checkpoint: a vimexp one's saved config (`vimexp_config`, the
model's `pool`), else `src_pool`, else the layout of the released official Vims (`OFFICIAL_POOL`, middle); the count
of class-token keys decides between none, one and two. Loading one layout into a model with another class-token
layout is an error. `pos_embed_mode` says how pos_embed is fitted to the model's grid: 'correct' (class rows found
where the layout puts them) or 'official' (hustvl/Vim's loaders: the first rows taken as class rows whatever the
layout; docs/official_impl.md §3, §6.7).
"""
import argparse
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_download
from timm.layers import resample_abs_pos_embed

from vimexp import VimexpError
from vimexp.models.vim import resample_grid


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


OFFICIAL_POOL = "middle"  # the released official Vims (and any official-format file unless told otherwise)
POS_EMBED_MODES = ("correct", "official")
CLS_KEYS = ("cls_token", "cls_token_head", "cls_token_tail")


class Weights(dict):
    """A checkpoint's state dict that also knows its class-token layout (`pool`, VisionMamba's name for it), so that
    whoever fits it to a model (load_checkpoint, vimexp.eval) reads the layout from the checkpoint, not the model."""
    pool: str | None = None


def _layout(pool: str | None) -> str:
    """The class-token layout of a pool: where its class tokens sit (mean and max have none)."""
    return pool if pool in ("head", "middle", "double") else "none"


def _num_cls(pool: str) -> int:
    return {"none": 0, "double": 2}.get(_layout(pool), 1)


def _saved_pool(ckpt: dict) -> str | None:
    """The model pool a vimexp checkpoint's saved config names (VisionMamba's default if none); None for others."""
    if "vimexp_config" not in ckpt:
        return None
    return (ckpt["vimexp_config"].get("model") or {}).get("pool", OFFICIAL_POOL)


def checkpoint_pool(ckpt: dict, sd: dict, src_pool: str | None = None) -> str:
    """The class-token layout of `sd` (the weights of `ckpt`): two class-token keys are 'double', none 'mean'; one is
    what a vimexp checkpoint's config says, else `src_pool`, else OFFICIAL_POOL. A `src_pool` the checkpoint
    contradicts is an error."""
    n, saved = sum(k in sd for k in CLS_KEYS), _saved_pool(ckpt)
    found = {0: "mean", 2: "double"}.get(n) or (saved if _num_cls(saved) == 1 else None)  # what the file says
    pool = found or src_pool or OFFICIAL_POOL
    if src_pool and found and _layout(src_pool) != _layout(found):
        why = "its saved config" if saved and found == saved else f"its {n} class-token key(s)"
        raise VimexpError(f"src_pool={src_pool!r} was asked, but the checkpoint's class tokens are laid out as "
                          f"pool={found!r} (by {why}): leave src_pool out")
    if src_pool and _num_cls(src_pool) != n:
        raise VimexpError(f"src_pool={src_pool!r} has {_num_cls(src_pool)} class token(s), the checkpoint {n}: "
                          "pass src_pool=head or middle")
    return pool


def extract_state_dict(ckpt: dict, use_ema: bool = False, src_pool: str | None = None) -> Weights:
    """The backbone weights of an official ({'model', 'model_ema'}), vimexp ({'state_dict'}) or plain checkpoint, with
    their class-token layout (see checkpoint_pool; `src_pool` for an official-format file that isn't middle-token)."""
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
    weights = Weights(sd)
    weights.pool = checkpoint_pool(ckpt, sd, src_pool)
    return weights


def adapt_pos_embed(model, sd: dict, pos_embed_mode: str = "correct") -> dict:
    """Resample pos_embed to the model's grid (another resolution or stride). A Vim: class tokens laid out as
    `sd.pool` (a Weights; a plain dict: by its class-token keys, one meaning OFFICIAL_POOL) and, by `pos_embed_mode`,
    kept in place ('correct') or taken from the front ('official'); a model without class tokens drops them."""
    if "pos_embed" not in sd:
        return sd
    src_pool = getattr(sd, "pool", None) or checkpoint_pool({}, sd)
    sd = dict(sd)
    if hasattr(model, "resample_pos_embed"):  # Vim
        sd["pos_embed"] = fit_vim_pos_embed(model, sd["pos_embed"], src_pool, pos_embed_mode)
        for key in CLS_KEYS:
            if key in sd and not hasattr(model, key):  # a backbone without class token (segmentation) drops them
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


def fit_vim_pos_embed(model, pos_embed: torch.Tensor, src_pool: str, mode: str = "correct") -> torch.Tensor:
    """A Vim checkpoint's pos_embed (class tokens laid out as `src_pool`) fitted to `model`; see adapt_pos_embed."""
    if mode not in POS_EMBED_MODES:
        raise VimexpError(f"unknown pos_embed mode {mode!r}: choose one of {', '.join(POS_EMBED_MODES)}")
    if model.num_cls_tokens and _layout(src_pool) != _layout(model.pool):
        raise VimexpError(f"the checkpoint's class tokens are laid out as pool={src_pool!r}, the model's as "
                          f"pool={model.pool!r}: build the model with pool={src_pool}, or, for an official-format "
                          f"file that is not {OFFICIAL_POOL}-class-token, pass its layout (src_pool=..., "
                          "model.init_src_pool)")
    if mode == "correct" or pos_embed.shape == model.pos_embed.shape and _layout(src_pool) == _layout(model.pool):
        return model.resample_pos_embed(pos_embed, src_pool)
    return front_token_pos_embed(pos_embed, _num_cls(src_pool), model.patch_embed.grid_size,
                                 keep=bool(model.num_cls_tokens))


def front_token_pos_embed(pos_embed: torch.Tensor, n: int, grid_size, keep: bool) -> torch.Tensor:
    """What hustvl/Vim's loaders do (main.py --finetune, vim/utils.py:interpolate_pos_embed, seg/det): the first `n`
    rows taken as the class rows whatever the layout, the rest resampled (bicubic) as the square grid; the class rows
    stay in front (`keep`), or go, as the dense backbones' `pos_embed[:, 1:]` drops them. With a middle class token
    this moves patch (0, 0)'s row into the class rows and the class row into the grid (docs/official_impl.md §6.7)."""
    grid = pos_embed[:, n:]
    side = round(grid.shape[1] ** 0.5)
    if side * side != grid.shape[1]:
        raise VimexpError(f"checkpoint pos_embed has {pos_embed.shape[1]} rows: not {n} class row(s) and a square grid")
    grid = resample_grid(grid, grid_size)
    return torch.cat([pos_embed[:, :n], grid], 1) if keep else grid


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


def load_checkpoint(model, path, use_ema: bool = False, ignore: tuple[str, ...] = (), src_pool: str | None = None,
                    pos_embed_mode: str = "correct"):
    """Load weights into `model` in place; keys starting with a prefix in `ignore` (e.g. 'head.') are skipped.
    src_pool: the class-token layout of an official-format file (default OFFICIAL_POOL, the released Vims'; a vimexp
    checkpoint knows its own). pos_embed_mode: 'correct' or 'official' (see adapt_pos_embed)."""
    sd = adapt_pos_embed(model, extract_state_dict(read_checkpoint(path), use_ema, src_pool), pos_embed_mode)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)} if ignore else sd
    check_compatible(model, sd, ignore)
    model.load_state_dict(sd, strict=not ignore)
    return model


def pretrained_file(cfg: dict, cache_dir=None) -> Path:
    """The checkpoint a timm pretrained_cfg names: its `file`, else its Hugging Face file, from the local cache or
    downloaded (never the network with HF_HUB_OFFLINE=1)."""
    if cfg.get("file"):
        return Path(cfg["file"])
    name, repo, filename = cfg.get("architecture"), cfg.get("hf_hub_id"), cfg.get("hf_hub_filename")
    pass_file = "pass the file (pretrained=<path>, or timm's pretrained_cfg_overlay=dict(file=<path>))"
    if not repo:
        raise VimexpError(f"{name} has no released weights: {pass_file}")
    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
    except OSError as e:  # not cached and offline or unreachable, or no such repo or file: OSErrors in huggingface_hub
        where = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        raise VimexpError(f"{name}: {filename} of the Hugging Face repo {repo} is neither in the local cache ({where}) "
                          f"nor downloadable ({type(e).__name__}): run `hf download {repo} {filename}` where there is "
                          f"network and copy that cache here, or {pass_file}") from None


def load_pretrained(model, cfg: dict, source=True, cache_dir=None):
    """Load released weights into `model`: `source` True for the file `cfg` (a timm pretrained_cfg) names, or a path.
    As in timm, the classifier is skipped when the model's class count differs from the cfg's."""
    path = pretrained_file(cfg, cache_dir) if source is True else source
    head = cfg.get("classifier")
    ignore = (f"{head}.",) if head and getattr(model, "num_classes", None) != cfg.get("num_classes") else ()
    return load_checkpoint(model, path, ignore=ignore)
