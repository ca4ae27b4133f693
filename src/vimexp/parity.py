"""docs/parity.md from the configs: every setting of Tables 1-3 beside its official value, vimexp's default and the
override that gives the other one (`python -m vimexp.parity`, `make parity`).

experiments/parity.yaml holds the official values with their sources; everything in vimexp's columns is read from the
configs as `python -m vimexp.train experiment=<name>` composes them (and from the backbone its task builds from them),
so the document can't drift from the configs: tests/test_parity.py regenerates it and compares."""
import copy
import functools
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from vimexp.cli import CONF_DIR, is_group, setup

ROOT = CONF_DIR.parent
SPEC = ROOT / "experiments" / "parity.yaml"
DOC = ROOT / "docs" / "parity.md"

# What vimexp's code fixes without a key, where the official code has a setting: stated so the document shows it.
CODE = {
    "residual_in_fp32": True,        # vimexp.models.vim.Block: rms_norm(..., residual_in_fp32=True)
    "poly_min_lr": 0.0,              # vimexp.tasks.optim.poly_with_warmup decays to 0
    "ddp_grad_compression": "none",  # Lightning's DDP, no communication hook
}
# the image size each task builds its backbone for (None: the classifier, at model.img_size)
DENSE_SIZE = {"ClassificationTask": None, "SegmentationTask": "crop_size", "DetectionTask": "size"}


# ----- the configs, composed as the CLI composes them

@contextmanager
def hydra_session():
    """One Hydra initialisation for many compositions (each one alone would initialise it again)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        yield
        return
    setup()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield


_ABSENT = object()


@functools.cache
def compose(experiment: str, overrides: tuple[str, ...] = ()):
    """The experiment's config with `overrides`. Group choices (recipe=...) compose anew; key=value overrides are
    merged into the composed experiment as Hydra merges them after its defaults, which gives what a composition with
    them gives at a fraction of its cost."""
    from hydra import compose as hydra_compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if overrides and not any(_is_group(o.key_or_group) or o.is_delete() for o in parsed):
        cfg = copy.deepcopy(compose(experiment, ()))
        for o in parsed:
            absent = OmegaConf.select(cfg, o.key_or_group, default=_ABSENT) is _ABSENT
            if absent and not (o.is_add() or o.is_force_add()):
                raise KeyError(f"{experiment}: override {o.input_line} names no config key (+ adds one)")
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=True)
        return cfg
    with hydra_session():
        return hydra_compose("train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)


def _is_group(key: str) -> bool:
    return "/" in key or is_group(key)


class _NoInit(TorchFunctionMode):
    """Skips in-place tensor ops (the weight initialisers): only the backbone's structure is read, and initialising
    Vim-B or DeiT-B on a CPU takes seconds."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes its tensor by keyword
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and isinstance(target, torch.Tensor):
            return target
        return func(*args, **kwargs)


@functools.cache
def backbone(experiment: str, overrides: tuple[str, ...] = ()):
    """The backbone the experiment's task builds (vimexp.models.backbone.build_backbone), without its weights."""
    from vimexp.models.backbone import build_backbone
    cfg = compose(experiment, overrides)
    model = {**OmegaConf.to_container(cfg.model, resolve=True), "init_from": None}
    size_key = DENSE_SIZE[cfg.task._target_.rsplit(".", 1)[-1]]
    with _NoInit():
        if size_key is None:
            return build_backbone(model)
        return build_backbone(model, dense=True, img_size=cfg.task[size_key])


# ----- settings: config keys, the built backbone, expressions

def _class_token(m) -> str:
    if hasattr(m, "layers"):  # Vim
        if not m.num_cls_tokens:
            return f"none ({m.pool} pool)" if m.num_classes else "none"
        return f"{m.pool} ({', '.join(map(str, m.cls_positions()))})"
    return "head (0)" if getattr(m, "cls_token", None) is not None else "none"


ARCH = {
    "depth": lambda m: len(m.feature_info),
    "embed_dim": lambda m: m.embed_dim,
    "num_heads": lambda m: m.blocks[0].attn.num_heads,
    "d_state": lambda m: m.layers[0].mixer.d_state,
    "expand": lambda m: m.layers[0].mixer.out_proj.in_features // m.embed_dim,
    "patch_size": lambda m: m.patch_embed.proj.kernel_size[0],
    "stride": lambda m: m.patch_embed.proj.stride[0],
    "img_size": lambda m: m.patch_embed.img_size[0],
    "tokens": lambda m: m.pos_embed.shape[1:-1].numel(),  # (1, L, D), or (1, H, W, D) for ViTDet
    "class_token": _class_token,
    "divide_out": lambda m: m.layers[0].mixer.divide_out,
    "rope": lambda m: m.rope is not None,
    "rope_residual": lambda m: m.rope_residual,
    "norm_eps": lambda m: next(x.eps for x in m.modules() if type(x).__name__ in ("LayerNorm", "RMSNorm")),
    "drop_rate": lambda m: m.pos_drop.p,
    "window_size": lambda m: max(b.window_size for b in m.blocks),
    "global_blocks": lambda m: [i for i, b in enumerate(m.blocks) if b.window_size == 0],
    "rel_pos": lambda m: m.blocks[0].attn.use_rel_pos,
}


def _is_dense(cfg) -> bool:
    return DENSE_SIZE[cfg.task._target_.rsplit(".", 1)[-1]] is not None


def lr_effective(cfg) -> float:
    """The lr the optimizer gets, by the tasks' own rule (vimexp.tasks.optim.scaled_lr)."""
    from vimexp.tasks.optim import scaled_lr
    return scaled_lr(cfg.optimizer, cfg.data.batch_size * cfg.trainer.accumulate_grad_batches, _is_dense(cfg))


def wd_exempt(cfg) -> str:
    """Which parameters skip weight decay (classification: timm's create_optimizer_v2; dense: tasks.optim)."""
    if not _is_dense(cfg):
        return "1-d, biases, no_weight_decay()"
    if cfg.optimizer.get("wd_exempt", "timm") == "detectron2":
        return "torch norm modules, pos_embed"
    intended = cfg.optimizer.get("layer_decay_mode", "official") == "intended"
    return "1-d, biases, pos_embed" if intended else "1-d, biases (pos_embed decayed)"


def layer_decay_scope(cfg) -> str:
    """What tasks.optim.param_groups decays: per layer (intended), or the embeddings only (the seg configs' bug)."""
    if not cfg.optimizer.get("layer_decay"):
        return "none"
    return "per layer" if cfg.optimizer.get("layer_decay_mode", "official") == "intended" else "embeddings only"


def adamw_eps(cfg) -> float:
    if _is_dense(cfg):  # tasks.optim.dense_optimizers leaves torch's default
        return inspect.signature(torch.optim.AdamW).parameters["eps"].default
    return cfg.optimizer.get("eps", 1e-8)


EXPRESSIONS = {
    "lr_effective": lr_effective,
    "wd_exempt": wd_exempt,
    "layer_decay_scope": layer_decay_scope,
    "adamw_eps": adamw_eps,
    "scheduler": lambda cfg: cfg.hydra.runtime.choices.scheduler,
}


def value(experiment: str, key: str, overrides: tuple[str, ...] = ()):
    """A setting of the composed experiment: `arch.<attr>`, `code.<name>`, an expression, or a config key."""
    head, _, attr = key.partition(".")
    if head == "arch":
        return ARCH[attr](backbone(experiment, overrides))
    if head == "code":
        return CODE[attr]
    cfg = compose(experiment, overrides)
    if key in EXPRESSIONS:
        return EXPRESSIONS[key](cfg)
    if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        raise KeyError(f"{experiment}: no config key {key}")
    found = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found


# ----- comparing and showing values

def _plain(v):
    if v is None:
        return "none"  # parity.yaml writes `none` for a setting that is off (null there: no official value)
    return list(v) if isinstance(v, tuple) else v


def same(a, b) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def show(v) -> str:
    v = _plain(v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(show, v)) + "]"
    return str(v).replace("|", "\\|")


# ----- parity.yaml: the catalog, the tables, each experiment's entries

def load_spec(path: Path = SPEC) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def _entry(raw) -> dict:
    if isinstance(raw, list):  # [official, source]
        if len(raw) != 2:
            raise ValueError(f"parity.yaml entry {raw} is not [official, source]: quote a source with commas")
        return {"official": raw[0], "source": raw[1]}
    return dict(raw)


def entries(experiments: dict, name: str) -> dict:
    """An experiment's setting entries, its `base:` experiment's first (own entries replace them, `drop:` removes)."""
    exp = experiments[name]
    out = entries(experiments, exp["base"]) if exp.get("base") else {}
    out = {k: v for k, v in out.items() if k not in exp.get("drop", [])}
    return {**out, **{k: _entry(v) for k, v in (exp.get("settings") or {}).items()}}


@dataclass
class Row:
    setting: str
    key: str
    official: object
    source: str
    vimexp: object
    status: str               # a key of STATUS
    other: str = ""           # the override, the value it gives and why; or the known gap
    problem: str = ""         # what the test reports


def _status(ours, e: dict) -> str:
    if e.get("official") is None:
        return "n/a"
    if same(ours, e["official"]):
        return "same"
    documented = [s for s in ("equivalent", "known_gap", "override") if e.get(s)]
    return documented[0] if documented else "undocumented"


def _other(experiment: str, key: str, e: dict) -> tuple[str, object]:
    """The last column, and the value the override gives (None without one)."""
    if e.get("known_gap"):
        return f"known gap: {e['known_gap']}", None
    if not e.get("override"):
        return "", None
    other = value(experiment, key, tuple(e["override"].split()))
    why = "; ".join(x for x in (e.get("reason"), e.get("equivalent") and f"equivalent: {e['equivalent']}") if x)
    return f"`{e['override']}` → {show(other)}: {why}", other


def _problem(r: Row, e: dict, other) -> str:
    if r.status == "undocumented":
        return f"vimexp {show(r.vimexp)} vs official {show(r.official)}, with no override, equivalent or known_gap"
    if e.get("override") and not (e.get("reason") or e.get("equivalent")):
        return f"override `{e['override']}` without a reason"
    if r.status in ("override", "equivalent") and e.get("override") and not same(other, r.official):
        return f"`{e['override']}` gives {show(other)}, not the official {show(r.official)}"
    if e.get("known_gap") and r.status != "known_gap":
        return "a known_gap on a setting that isn't one: remove it"
    return ""


def row(experiment: str, setting: dict, e: dict) -> Row:
    ours = value(experiment, setting["key"])
    r = Row(setting["label"], setting["key"], e.get("official"), e.get("source", ""), ours, _status(ours, e))
    r.other, other = _other(experiment, setting["key"], e)
    r.problem = _problem(r, e, other)
    return r


def table_rows(spec: dict) -> list[tuple[dict, str, dict, list[Row]]]:
    """(table, experiment, its parity.yaml entry, rows) for every experiment, in parity.yaml's order."""
    out = []
    with hydra_session():
        for table in spec["tables"]:
            for name, exp in table["experiments"].items():
                found = entries(table["experiments"], name)
                unknown = sorted(set(found) - set(spec["settings"]))
                if unknown:
                    raise KeyError(f"{name}: settings {unknown} are not in parity.yaml's catalog")
                rows = [row(name, spec["settings"][sid], found[sid]) for sid in spec["settings"] if sid in found]
                out.append((table, name, exp, rows))
    return out


def problems(tables) -> list[str]:
    """What tests/test_parity.py fails on, one line each: undocumented differences, overrides that don't give the
    official value, reasons missing, stale known gaps."""
    return [f"{name}: {r.setting} ({r.key}): {r.problem}" for _, name, _, rows in tables for r in rows if r.problem]


# ----- docs/parity.md

STATUS = {"same": "same", "equivalent": "equivalent", "override": "differs (override)",
          "known_gap": "differs (known gap)", "n/a": "n/a", "undocumented": "**differs**"}
HEADER = """# Parity with the official settings: Tables 1, 2 and 3

Generated by `python -m vimexp.parity` (`make parity`) from `experiments/parity.yaml` (the official values and their
sources) and the configs: each experiment composed as `python -m vimexp.train experiment=<name>` composes it, and the
backbone its task builds from that config (rows in the order of the catalog). Don't edit it by hand;
`tests/test_parity.py` fails when it is out of date, when vimexp's default differs from an official value without an
override, an equivalence or a known gap, and when an override does not give the official value.

Status: *same*; *equivalent*: another implementation of the same computation (a kernel), equal to float rounding;
*differs (override)*: vimexp's default is another value, and the override in the last column (composed here, with the
value it gives) selects the official one; *differs (known gap)*: no option gives it, the last column says why it
stands; *n/a*: no official value (not released or not stated; the source says which); **differs** in bold:
undocumented. Where the default is the official value, the last column may give the override for another variant
(the paper's text, Appendix B). Sources are files of hustvl/Vim at `dd0358a` unless a commit is named, `deit ...`
files of facebookresearch/deit; § numbers are docs/official_impl.md's.
"""


def _summary(tables) -> list[str]:
    lines = ["| table | experiments | settings | same | equivalent | override | known gap | n/a | undocumented |",
             "|---" * (len(STATUS) + 3) + "|"]
    for table in dict.fromkeys(t["name"] for t, *_ in tables):
        rows = [r for t, _, _, rs in tables if t["name"] == table for r in rs]
        count = {s: sum(r.status == s for r in rows) for s in STATUS}
        names = sum(t["name"] == table for t, *_ in tables)
        lines.append(f"| {table} | {names} | {len(rows)} | " + " | ".join(str(count[s]) for s in STATUS) + " |")
    return lines


def _experiment(name: str, exp: dict, rows: list[Row]) -> list[str]:
    lines = [f"### `{name}`", ""]
    if exp.get("note"):
        lines += [exp["note"][0].upper() + exp["note"][1:], ""]
    lines += ["| setting | key | official | source | vimexp | status | the other value |", "|---" * 7 + "|"]
    for r in rows:
        official = "—" if r.official is None else show(r.official)
        lines.append(f"| {r.setting} | `{r.key}` | {official} | {r.source} | {show(r.vimexp)} | {STATUS[r.status]} | "
                     f"{r.other} |")
    return lines + [""]


def render(tables) -> str:
    """docs/parity.md from table_rows(...)."""
    lines = [HEADER, *_summary(tables), ""]
    title = None
    for table, name, exp, rows in tables:
        if table["title"] != title:
            title = table["title"]
            lines += [f"## {title}", ""]
        lines += _experiment(name, exp, rows)
    return "\n".join(lines).rstrip() + "\n"


def main():
    tables = table_rows(load_spec())
    DOC.write_text(render(tables))
    found = problems(tables)
    print(f"wrote {DOC.relative_to(ROOT)}" + "".join(f"\n  {p}" for p in found))
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
