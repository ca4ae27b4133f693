import os
import shutil
import subprocess
import sys
from pathlib import Path

if shutil.which("nvidia-smi") is None:  # no GPU: the Triton kernels run in Triton's interpreter, which it reads
    os.environ.setdefault("TRITON_INTERPRET", "1")  # from the environment when torch first imports it

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from vimexp.data.synthetic import ensure_ade20k, ensure_coco, ensure_imagefolder
from vimexp.cli import CONF_DIR, setup

setup()  # the config resolvers, as the CLI registers them

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {"train_per_class": 8, "val_per_class": 4, "size": 32, "seed": 0}
# a tiny Vim for fast CLI runs: 2 layers of width 32 on the built-in 32 px data
TINY_RUN = ["++model.depth=2", "++model.embed_dim=32", "data.batch_size=16", "data.num_workers=0"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return ensure_imagefolder(tmp_path_factory.mktemp("data") / "shapes", **TINY_DATA)


TINY_SEG_DATA = {"train": 32, "val": 4, "size": 48, "seed": 0}


@pytest.fixture(scope="session")
def tiny_seg_data(tmp_path_factory) -> Path:
    """The built-in segmentation scenes in the ADE20K layout: returns the ADEChallengeData2016 folder."""
    return ensure_ade20k(tmp_path_factory.mktemp("seg") / "builtin", **TINY_SEG_DATA) / "ADEChallengeData2016"


def seg_data_overrides(root) -> list[str]:
    params = ",".join(f"{k}:{v}" for k, v in TINY_SEG_DATA.items())
    return [f"data.root={root}", f"data.generate_params={{{params}}}", "data.crop_size=48", "data.scale=[192,48]"]


TINY_DET_DATA = {"train": 16, "val": 4, "size": 64, "seed": 0}


@pytest.fixture(scope="session")
def tiny_det_data(tmp_path_factory) -> Path:
    """The built-in detection scenes in the COCO layout."""
    return ensure_coco(tmp_path_factory.mktemp("det") / "builtin", **TINY_DET_DATA)


def det_data_overrides(root) -> list[str]:
    params = ",".join(f"{k}:{v}" for k, v in TINY_DET_DATA.items())
    return [f"data.root={root}", f"data.generate_params={{{params}}}", "data.size=64", "data.num_classes=10"]


def data_overrides(root) -> list[str]:
    params = ",".join(f"{k}:{v}" for k, v in TINY_DATA.items())
    return [f"data.root={root}", f"data.generate_params={{{params}}}"]


def compose_cfg(overrides, out_dir, config="train"):
    """The real config, composed as the CLI would, with Hydra's runtime info set for in-process runs."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config, overrides=[*overrides, f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}/logs"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_cli(module, *args, cwd, env=None):
    """Run `python -m vimexp.<module> args...` as a user would; returns the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "offline", "VIMEXP_ROOT": str(cwd), **(env or {})}
    return subprocess.run([sys.executable, "-m", f"vimexp.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
