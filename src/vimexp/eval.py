"""Evaluate a checkpoint: `python -m vimexp.eval ckpt_path=<file> [experiment=...] [model=...] [split=...]`.

Takes a vimexp checkpoint (.ckpt, raw and EMA weights) or an official hustvl/Vim one (.pth: `model`, `model_ema`),
adapting pos_embed to the configured resolution, and writes results.json like a training run. A vimexp checkpoint
carries its run's resolved config: the model, data, task and recipe are taken from it, so only the command line's
own overrides need giving (they win, as does a group or experiment named on the command line).
"""
from pathlib import Path

from vimexp.cli import exit_on_help
exit_on_help("eval", __name__)  # `--help` answered before Lightning and torch are imported: in a second

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from vimexp import VimexpError
from vimexp.build import build_datamodule, build_loggers, build_task, build_trainer
from vimexp.cli import cli, save_run_config
from vimexp.models.checkpoint import adapt_pos_embed, check_compatible, extract_state_dict, read_checkpoint
from vimexp.record import run_record, write_json


def load_weights(task, ckpt: dict):
    """Raw weights into task.model, EMA weights (when the checkpoint and the task have them) into task.ema."""
    ema = getattr(task, "ema", None)
    for net, use_ema in ((task.model, False), *(((ema.module, True),) if ema else ())):
        sd = adapt_pos_embed(net, extract_state_dict(ckpt, use_ema))
        check_compatible(net, sd)
        net.load_state_dict(sd)


def has_ema(ckpt: dict) -> bool:
    if "state_dict" in ckpt:
        return any(k.startswith("ema.module.") for k in ckpt["state_dict"])
    return bool(ckpt.get("model_ema"))


SECTIONS = ("model", "data", "task", "optimizer", "scheduler")  # what a run's checkpoint config decides


def with_checkpoint_config(cfg, saved: dict, overrides: list[str]):
    """`cfg` with each section of the training run's config, except sections the command line chose itself (a group
    or an experiment), then the command line's key overrides again on top."""
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    keys = [k for k in chosen if "." in k]
    with open_dict(cfg):
        for section in SECTIONS:
            if section in saved and section not in chosen and "experiment" not in chosen:
                node = OmegaConf.create(saved[section])
                for key in (k for k in keys if k.startswith(section + ".")):
                    OmegaConf.update(node, key.split(".", 1)[1], OmegaConf.select(cfg, key), force_add=True)
                cfg[section] = node
        cfg.model.init_from = None  # the checkpoint's own weights are loaded below
    return cfg


def evaluate(cfg) -> dict:
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise VimexpError("ckpt_path is missing: python -m vimexp.eval ckpt_path=<run dir>/checkpoints/best.ckpt "
                          "(or an official .pth)")
    L.seed_everything(cfg.seed)
    ckpt = read_checkpoint(cfg.ckpt_path)
    if "vimexp_config" in ckpt:
        cfg = with_checkpoint_config(cfg, ckpt["vimexp_config"], list(HydraConfig.get().overrides.task))
    save_run_config(cfg, Path(cfg.paths.output_dir))
    task = build_task(cfg, **({"ema_decay": cfg.task.ema_decay if has_ema(ckpt) else None}
                              if "ema_decay" in cfg.task else {}))
    load_weights(task, ckpt)
    datamodule = build_datamodule(cfg, **({"val_split": cfg.split} if cfg.split else {}))
    trainer = build_trainer(cfg, loggers=build_loggers(cfg))
    trainer.validate(task, datamodule=datamodule)
    record = {**run_record(cfg, task, trainer), "ckpt_path": str(Path(cfg.ckpt_path).resolve()), "split": cfg.split}
    out = Path(cfg.paths.output_dir)
    write_json(out / "results.json", record)
    print(f"results in {out.resolve()}/results.json: " +
          ", ".join(f"{k} {v:.2f}" for k, v in record["final"].items()))
    return record


def main():
    cli(evaluate, "eval")


if __name__ == "__main__":
    main()
