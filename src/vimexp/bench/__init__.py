"""Every benchmark behind one command line, `python -m vimexp.bench bench=<name> [key=value ...]` (conf/bench.yaml,
conf/bench/<name>.yaml); `bench.tool` picks the module that runs it:

    bench=fig1|fig3_4|train|train_hier   backbones: throughput and peak memory vs resolution (vimexp.bench.backbones)
    bench=mixer [bench.sweep=true]       the bimamba v2 mixer alone, fused against mamba-ssm (vimexp.bench.mixer)
    bench=ddp bench.devices=2            data-parallel training: scaling, 1-vs-N-GPU equivalence (vimexp.bench.ddp)
    bench=speedup                        the README's speed-up figure, from two runs' results.csv (vimexp.bench.plots)
    bench=loader                         the training data loader alone, per number of workers (vimexp.bench.loader)
    bench=pipeline                       the CLI's img/s on JPEGs against the model step's (vimexp.bench.pipeline)

One timing loop and GPU spin-up for all of them (vimexp.bench.timing); each record carries vimexp.record.environment
(device, driver, versions, date, commit) and the command that made it.
"""
import importlib

from vimexp import VimexpError

TOOLS = ("backbones", "mixer", "ddp", "plots", "loader", "pipeline")


def pick_device(name: str):
    """`auto`: the GPU if torch sees one, else the CPU (a torch.device)."""
    import torch  # here, not at the top: `--help` answers before torch loads
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def say(line: str):
    """print() under a progress bar (tqdm's, on stderr): the bar is cleared, the line printed, the bar drawn again."""
    from tqdm import tqdm
    with tqdm.external_write_mode():
        print(line, flush=True)


def command(*overrides: str) -> str:
    """The command line of this run: `python -m vimexp.bench` and the Hydra overrides it was given (or `overrides`)."""
    if not overrides:
        from hydra.core.hydra_config import HydraConfig
        overrides = tuple(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ()
    return " ".join(["python -m vimexp.bench", *overrides])


def compose_train(overrides: list[str]):
    """conf/train.yaml with `overrides`, from inside a Hydra job (this benchmark's) or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vimexp.cli import CONF_DIR
    if GlobalHydra.instance().is_initialized():  # the bench job's: its search path is CONF_DIR
        return compose("train", overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run(cfg) -> dict:
    """Run the benchmark `cfg.bench` names (its `tool`: backbones, the default, or mixer, ddp, plots, loader,
    pipeline)."""
    tool = cfg.bench.get("tool", "backbones")
    if tool not in TOOLS:
        raise VimexpError(f"unknown bench.tool {tool!r}: choose one of {', '.join(TOOLS)}")
    return importlib.import_module(f"vimexp.bench.{tool}").run(cfg)


def main():
    from vimexp.cli import cli
    cli(run, "bench")
