"""Evaluate a checkpoint: `python -m vimexp.eval ckpt_path=<file> [experiment=...] [model=...] [split=...]`.

Takes a vimexp checkpoint (.ckpt, raw and EMA weights) or an official hustvl/Vim one (.pth: `model`, `model_ema`),
adapting pos_embed to the configured resolution, and writes results.json like a training run.
"""
from pathlib import Path

import lightning as L

from vimexp.models.checkpoint import adapt_pos_embed, check_compatible, extract_state_dict, read_checkpoint
from vimexp.run import build_datamodule, build_loggers, build_task, build_trainer, cli, run_record, write_json


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


def evaluate(cfg) -> dict:
    L.seed_everything(cfg.seed)
    ckpt = read_checkpoint(cfg.ckpt_path)
    classification = cfg.task.get("name", "classification") == "classification"
    task = build_task(cfg, **({"ema_decay": cfg.task.ema_decay if has_ema(ckpt) else None} if classification else {}))
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
