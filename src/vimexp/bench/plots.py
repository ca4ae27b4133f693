"""Bar charts of img/s from runs of `python -m vimexp.bench` (their results.csv), each bar labelled with its ratio to
the first bar of its panel: `python -m vimexp.bench bench=speedup` draws the README's speed-up figure from the kept
H200 runs (conf/bench/speedup.yaml; `out_dir=...` says where the PNG goes)."""
import csv
from pathlib import Path

from vimexp import VimexpError
from vimexp.record import REPO

COLORS = ["#999", "#2a7", "#c63", "#36c"]


def img_per_sec(path: Path, where: dict | None = None) -> dict[str, float]:
    """model -> img/s of one results.csv, from its rows whose columns equal `where`'s values (e.g. res, batch)."""
    where = {k: str(v) for k, v in (where or {}).items()}
    with open(path) as f:
        return {r["model"]: float(r["img_per_sec"]) for r in csv.DictReader(f)
                if r.get("img_per_sec") and all(r.get(k) == v for k, v in where.items())}


def speedup_figure(panels: list[dict], title: str, path: Path, size=(14, 3.8), dpi=110) -> Path:
    """One panel per {title, csv, bars: {label: model}, where (optional): {column: value}}: the bars' img/s and
    their ratio to the panel's first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=tuple(size), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        rows = img_per_sec(Path(panel["csv"]), panel.get("where"))
        missing = [m for m in panel["bars"].values() if m not in rows]
        if missing:
            raise VimexpError(f"{panel['csv']} has no img/s for {', '.join(missing)}")
        bars = {label: rows[model] for label, model in panel["bars"].items()}
        base = next(iter(bars.values()))
        ax.bar(list(bars), list(bars.values()), color=COLORS[:len(bars)])
        for i, v in enumerate(bars.values()):
            ax.text(i, v, f"{v:.0f}\n{v / base:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set(title=panel["title"], ylabel="images / s")
        ax.margins(y=0.25)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def run(cfg) -> dict:
    b = cfg.bench
    # a relative csv path is the repository's (the kept runs), wherever the command runs
    panels = [{"title": p.title, "csv": str(Path(p.csv) if Path(p.csv).is_absolute() else REPO / p.csv),
               "bars": dict(p.bars), "where": dict(p.get("where") or {})} for p in b.panels]
    path = speedup_figure(panels, b.title, Path(cfg.out_dir) / b.file)
    print(f"figure in {path.resolve()}")
    return {"figure": str(path), "panels": panels}
