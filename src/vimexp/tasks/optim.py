"""The dense tasks' optimisation: AdamW parameter groups with layer-wise lr decay over the backbone, and per-iteration
lr schedules with linear warm-up (MMSeg's poly, detectron2's multi-step)."""
import torch
import torch.nn as nn

from vimexp import VimexpError
from vimexp.models.backbone import num_layers

WD_EXEMPT = ("timm", "detectron2")
# detectron2's get_default_optimizer_params(weight_decay_norm=0) exempts modules of exactly these torch classes. Its
# own channels-first LayerNorm ("LN" in the ViTDet neck and heads) and Mamba's RMSNorm are plain nn.Modules, so they
# are decayed; vimexp's LayerNorm2d there subclasses nn.LayerNorm, hence the exact class, not isinstance.
TORCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)


def no_decay_names(model: nn.Module, wd_exempt: str, mode: str) -> set[str]:
    """Parameter names without weight decay. timm (and MMSeg's layer-decay constructor): every 1-d parameter and
    bias, and pos_embed in mode 'intended'. detectron2 (the official Vim-Det / ViTDet configs): the parameters of torch
    norm modules and those named pos_embed (its override), nothing else: biases, Mamba's D and dt biases decay."""
    if wd_exempt not in WD_EXEMPT:
        raise VimexpError(f"unknown optimizer.wd_exempt {wd_exempt!r}: choose one of {', '.join(WD_EXEMPT)}")
    if wd_exempt == "timm":
        return {n for n, p in model.named_parameters()
                if p.ndim == 1 or n.endswith(".bias") or (mode == "intended" and "pos_embed" in n)}
    norms = {f"{m_name}.{n}".lstrip(".") for m_name, m in model.named_modules() if type(m) in TORCH_NORMS
             for n, _ in m.named_parameters(recurse=False)}
    return norms | {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "pos_embed"}


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None, mode: str,
                 wd_exempt: str = "timm") -> list[dict]:
    """AdamW groups with BEiT's layer-wise lr decay over a depth-L backbone: layer id 0 for the patch/pos embedding,
    i + 1 for layer i, L + 1 for necks and heads; lr x rate^(L + 1 - id). mode 'official' reproduces what the released
    configs did: their decay looked for `blocks.*`, so every Mamba layer landed in group L + 1 (rate^0) and only the
    embeddings were decayed (rate^(L + 1)); and pos_embed was weight-decayed. 'intended' decays every layer and
    exempts pos_embed. Which parameters skip weight decay: no_decay_names."""
    if mode not in ("official", "intended"):
        raise VimexpError(f"unknown layer_decay_mode {mode!r}: choose official or intended")
    backbone = model.backbone
    depth = num_layers(backbone)
    exempt = no_decay_names(model, wd_exempt, mode)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer_id = depth + 1
        if name.startswith("backbone."):
            short = name[len("backbone."):]
            if short.startswith(("patch_embed", "pos_embed", "cls_token")):
                layer_id = 0
            elif mode == "intended" and short.startswith(("layers.", "blocks.")):
                layer_id = int(short.split(".")[1]) + 1
        scale = layer_decay ** (depth + 1 - layer_id) if layer_decay else 1.0
        no_decay = name in exempt
        group = groups.setdefault((scale, no_decay), {"params": [], "lr": lr * scale, "lr_scale": scale,
                                                      "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
    return list(groups.values())


def poly_with_warmup(step: int, total: int, warmup: int, warmup_ratio: float = 1e-6, power: float = 1.0) -> float:
    """The lr factor of MMSeg's poly schedule (min 0) with linear warm-up from warmup_ratio."""
    poly = (1 - min(step, total) / total) ** power
    if step < warmup:
        return poly * (1 - (1 - step / warmup) * (1 - warmup_ratio))
    return poly


def multistep_with_warmup(step: int, milestones, warmup: int, warmup_ratio: float = 1e-3, gamma: float = 0.1) -> float:
    """The lr factor of detectron2's WarmupMultiStepLR (linear warm-up from warmup_ratio, x gamma at each milestone)."""
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup:
        return factor * (warmup_ratio + (1 - warmup_ratio) * step / warmup)
    return factor


def scaled_lr(optimizer, images_per_step: int, dense: bool) -> float:
    """The lr the optimizer gets: optimizer.lr x the images of an optimizer step / the recipe's base batch (512, as
    DeiT's and the official Vim's main.py; a dense recipe's optimizer.base_batch, where scaling is off by default)."""
    if not optimizer.get("scale_lr", not dense):
        return optimizer["lr"]
    return optimizer["lr"] * images_per_step / (optimizer["base_batch"] if dense else 512)


def dense_optimizers(task) -> dict:
    """configure_optimizers of a dense task (its `model` has a `backbone`): AdamW over param_groups, and the
    scheduler config's per-iteration schedule (name poly or multistep)."""
    o, s = task.hparams.optimizer, task.hparams.scheduler
    lr = scaled_lr(o, task.hparams.global_batch_size * task.trainer.accumulate_grad_batches, dense=True)
    groups = param_groups(task.model, lr, o["weight_decay"], o.get("layer_decay"),
                          o.get("layer_decay_mode", "official"), o.get("wd_exempt", "timm"))
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.get("betas", (0.9, 0.999))), fused=True)
    total, name = task.trainer.estimated_stepping_batches, s.get("name", "poly")
    if name == "poly":
        factor = lambda step: poly_with_warmup(step, total, s["warmup_steps"], s.get("warmup_ratio", 1e-6),  # noqa: E731
                                               s.get("power", 1.0))
    elif name == "multistep":
        factor = lambda step: multistep_with_warmup(step, s["milestones"], s["warmup_steps"],  # noqa: E731
                                                    s.get("warmup_ratio", 1e-3), s.get("gamma", 0.1))
    else:
        raise VimexpError(f"scheduler {name!r} is not one of a dense task's: choose scheduler=poly or multistep")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
