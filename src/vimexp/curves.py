"""A run's training curves, drawn from its own metrics.csv: curves.png beside results.json, with the loss, the
learning rate and the task's monitored metric (raw and EMA weights where the run has both) against the step, with the
epoch on top."""
import csv
import sys
from pathlib import Path

LOSS = ("train/loss_step", "train/loss", "train/loss_epoch", "val/loss")
LR = ("train/lr",)


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """{column: {step: value}} of metrics.csv's numeric cells, its epoch column too. A resumed run logs the steps after
    its checkpoint again: the later row wins, as the resumed run is the one that went on."""
    series = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.pop("step")))
            except (KeyError, TypeError, ValueError):  # a row without a step can't be placed
                continue
            for column, cell in row.items():
                try:
                    value = float(cell)
                except (TypeError, ValueError):  # empty: logged in another row
                    continue
                series.setdefault(column, {})[step] = value
    return series


def steps_per_epoch(series: dict) -> float | None:
    """Steps an epoch, from the last step of the last epoch that another followed (or of the only one). Steps count
    from 0: epoch e ends at step e x steps_per_epoch - 1."""
    last = {}
    for step, epoch in series.get("epoch", {}).items():
        last[epoch] = max(step, last.get(epoch, -1))
    done = sorted(last)[:-1] or sorted(last)
    return (last[done[-1]] + 1) / (done[-1] + 1) if done else None


def panels(series: dict, monitor: str) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel that has something to draw; the EMA weights' metric beside the raw one's."""
    ema = monitor.replace("val/", "val_ema/", 1)
    wanted = [("loss", LOSS), ("learning rate", LR), (f"{monitor} (%)", (monitor, ema))]
    return [(title, cols) for title, columns in wanted if (cols := [c for c in columns if series.get(c)])]


def plot_curves(metrics_csv: Path, png: Path, monitor: str = "val/acc1") -> Path | None:
    """Draw metrics_csv's curves into png; None (and no file) when it holds none of them."""
    series = read_metrics(metrics_csv)
    shown = panels(series, monitor)
    if not shown:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_epoch = steps_per_epoch(series)
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.8), sharex=True, squeeze=False)
    for ax, (title, columns) in zip(axes[0], shown):
        for column in columns:
            points = sorted(series[column].items())
            ax.plot(*zip(*points), "o-" if len(points) < 30 else "-", markersize=3, label=column)  # dots while few
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if per_epoch:
            top = ax.secondary_xaxis("top", functions=(lambda s: (s + 1) / per_epoch, lambda e: e * per_epoch - 1))
            top.set_xlabel("epoch")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def write_curves(run_dir: Path, monitor: str) -> Path | None:
    """run_dir/curves.png from run_dir/metrics.csv, or None without one. The figure is a convenience: a failure to draw
    it is reported, never the end of a finished run."""
    metrics = Path(run_dir) / "metrics.csv"
    if not metrics.is_file():
        return None
    try:
        return plot_curves(metrics, Path(run_dir) / "curves.png", monitor)
    except Exception as e:
        print(f"warning: no curves.png ({type(e).__name__}: {e})", file=sys.stderr)
        return None
