"""The paper's tables from your own runs: `python -m vimexp.tables table4 [--preset builtin|paper] [-- overrides]`.

A table is defined in experiments/<name>.yaml: its rows (each one value of a swept config key, `experiment` or
`ablation`, and optionally its own `overrides`), the metric of each column and the paper's numbers. This tool
  1. finds the rows' finished runs (results.json tagged with this table and preset, made with the overrides given
     after `--`, no more and no fewer) under --runs (default logs/),
  2. runs the missing rows (all with --force): the plain ones as one Hydra multirun of `python -m vimexp.train`, a row
     with its own overrides as a run of its own; rows that start from another row's checkpoint (`init_from`) run last,
  3. renders Markdown and CSV: our value, the paper's, the difference, and each row's run directory and W&B run.
`--render-only` skips 2, e.g. to render runs copied from a cluster: `--runs /path/to/copied/logs --render-only`.
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from vimexp import VimexpError
from vimexp.cli import CONF_DIR, one_line_errors

ROOT = CONF_DIR.parent
TABLES_DIR = ROOT / "experiments"


def load_table(name: str) -> dict:
    path = TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in TABLES_DIR.glob("table*.yaml"))
        raise VimexpError(f"unknown table {name!r}: choose one of {', '.join(choices)}")
    return OmegaConf.to_container(OmegaConf.load(path))


def row_value(row: dict, preset: str) -> str | None:
    value = row.get("value")
    return value.get(preset) if isinstance(value, dict) else value


def row_overrides(row: dict, preset: str) -> list[str]:
    return list((row.get("overrides") or {}).get(preset) or [])


def row_key(row: dict, preset: str) -> str | None:
    """What finds a row's runs: the swept value, or for a row with its own overrides a name made from its label."""
    if row_overrides(row, preset):
        return re.sub(r"[^a-z0-9]+", "_", row["label"].lower().replace("†", " ft")).strip("_")
    return row_value(row, preset)


SET_FOR_A_ROW = ("table=", "table_preset=", "table_row=", "experiment_name=", "model.init_from=", "sweep_id=")


def extra_overrides(record: dict, table: dict, preset: str) -> list[str]:
    """The overrides a table's run was made with beyond those this tool sets for its row: what came after `--`."""
    key = record.get("table_row") or record.get(table["sweep"])
    row = next((r for r in table["rows"] if row_key(r, preset) == key), {})
    task_preset = (tasks_of(table).get(record.get("task", "classification")) or {}).get(preset) or []
    ours = {*task_preset, *row_overrides(row, preset), f"{table['sweep']}={row_value(row, preset)}"}
    return sorted(o for o in record.get("overrides") or [] if not o.startswith(SET_FOR_A_ROW) and o not in ours)


def find_results(runs: Path, table: dict, preset: str, extra: list[str]) -> dict[tuple[str, str], dict]:
    """{(task, row key): newest results.json} of the runs made for this table and preset with these `extra` overrides
    (those after `--`): a smoke test's runs (`-- trainer.max_epochs=1`) are not the rows of a real one."""
    found = {}
    for path in sorted(runs.rglob("results.json"), key=lambda p: p.stat().st_mtime):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a results file being written, or not ours
        if record.get("table") == table["name"] and record.get("table_preset") == preset and \
                extra_overrides(record, table, preset) == sorted(extra):
            key = record.get("table_row") or record.get(table["sweep"])
            found[(record.get("task", "classification"), key)] = record | {"_path": str(path)}
    return found


def metric(record: dict | None, spec: str):
    if record is None:
        return None
    if spec == "params_m":
        return round(record["params"] / 1e6, 2)
    section, _, key = spec.partition(".")
    value = record.get(section, {}).get(key)
    return None if value is None else round(value, 2)


class RowProgress:
    """tqdm's bar with the ETA over the rows to train, a line on stderr before each training run and one at the end:
    the runs' own output goes between (a bar redrawn in place would be overwritten by their progress bars)."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.done, self.started = name, total, 0, time.time()

    def show(self):
        print(tqdm.format_meter(self.done, self.total, time.time() - self.started, prefix=f"{self.name} rows",
                                unit="row"), file=sys.stderr, flush=True)


def _train(args: list[str], multirun: bool, progress: RowProgress, rows: int):
    cmd = [sys.executable, "-m", "vimexp.train", *(["-m"] if multirun else []), *args]
    progress.show()
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise VimexpError(f"training failed: {' '.join(cmd)} (its output is above)")
    progress.done += rows


def tasks_of(table: dict) -> dict[str, dict]:
    """{task: its presets}: the table's own task (`task`, default classification) with `presets`, and each other task
    that a column names with its `task_presets` (Table 4's mIoU column: the rows again, as segmentation runs)."""
    main = table.get("task", "classification")
    return {main: table["presets"], **table.get("task_presets", {})}


def run_missing(table: dict, preset: str, runs: Path, extra: list[str], force: bool, only=None, tasks=None):
    sweep = table["sweep"]
    trained = [r for r in table["rows"] if not r.get("cited") and (not only or row_key(r, preset) in only)]
    done = {} if force else find_results(runs, table, preset, extra)
    todo = {task: [r for r in trained if (task, row_key(r, preset)) not in done]
            for task in tasks_of(table) if not tasks or task in tasks}
    progress = RowProgress(table["name"], sum(map(len, todo.values())))
    for task, missing in todo.items():
        base = [f"table={table['name']}", f"table_preset={preset}", *tasks_of(table)[task][preset], *extra]
        plain = [row_value(r, preset) for r in missing if not r.get("init_from") and not row_overrides(r, preset)]
        if plain:
            _train([*base, f"{sweep}={','.join(plain)}"], len(plain) > 1, progress, len(plain))
        for row in sorted(missing, key=lambda r: bool(r.get("init_from"))):  # rows of their own, fine-tunes last
            if not (row.get("init_from") or row_overrides(row, preset)):
                continue
            own = [*row_overrides(row, preset), f"table_row={row_key(row, preset)}",
                   f"experiment_name={table['name']}_{row_key(row, preset)}"] if row_overrides(row, preset) else []
            if row.get("init_from"):
                source = next(r for r in trained if r["label"] == row["init_from"])
                record = find_results(runs, table, preset, extra).get((task, row_key(source, preset)))
                if record is None:
                    raise VimexpError(f"{row['label']} starts from {source['label']}, which has no finished run")
                own.append(f"model.init_from={Path(record['output_dir']) / 'checkpoints' / 'last.ckpt'}")
            _train([*base, f"{sweep}={row_value(row, preset)}", *own], False, progress, 1)
    if progress.total:
        progress.show()


def render(table: dict, preset: str, results: dict) -> tuple[str, list[dict]]:
    """Markdown and CSV rows: per column ours / paper / difference, then the run directory and W&B run id."""
    rows = []
    for row in table["rows"]:
        key = row_key(row, preset)
        main = results.get((table.get("task", "classification"), key))
        cells = {"row": row["label"]}
        for col, paper in zip(table["columns"], row.get("paper") or [None] * len(table["columns"])):
            task = col.get("task", table.get("task", "classification"))
            ours = None if row.get("cited") else metric(results.get((task, key)), col["metric"])
            cells[f"{col['name']} (ours)"] = "cited" if row.get("cited") else ours
            cells[f"{col['name']} (paper)"] = paper
            cells[f"{col['name']} (diff)"] = round(ours - paper, 2) if None not in (ours, paper) and not \
                row.get("cited") else None
        cells["run"] = str(Path(main["_path"]).parent) if main else None
        cells["wandb"] = main.get("wandb_run_id") if main else None
        rows.append(cells)
    show = lambda v: "—" if v is None else str(v)  # noqa: E731
    header = list(rows[0])
    lines = [f"### {table['title']} — preset `{preset}`", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for cells in rows:
        lines.append("| " + " | ".join(f"{v:+.2f}" if k.endswith("(diff)") and v is not None else show(v)
                                       for k, v in cells.items()) + " |")
    return "\n".join(lines) + "\n", rows


def filled(rows: list[dict]) -> int:
    """Rows with at least one value of ours (rendered, or read back from a table's CSV)."""
    return sum(any(v not in (None, "", "cited") for k, v in r.items() if k.endswith("(ours)")) for r in rows)


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vimexp.tables", description=__doc__.split("\n")[0])
    p.add_argument("table", help="table1, table4, table5, ... (experiments/<table>.yaml)")
    p.add_argument("--preset", default="builtin", help="builtin (2-core CPU scale) or paper (the paper's recipe)")
    p.add_argument("--runs", type=Path, default=Path(os.environ.get("VIMEXP_ROOT", ROOT)) / "logs",
                   help="where to look for finished runs (default: where training writes them, paths.log_dir)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results", help="where the table goes")
    p.add_argument("--force", action="store_true", help="run every row again")
    p.add_argument("--render-only", action="store_true", help="only render what is already in --runs")
    p.add_argument("--rows", help="run only these rows (comma-separated swept values, e.g. bidir_none,bidir_ssm, "
                                   "or for rows with their own overrides the label's name, e.g. vim_s)")
    p.add_argument("--tasks", help="run only these tasks' columns (comma-separated, e.g. classification)")
    p.epilog = "Extra overrides for every row go after --, e.g. -- data.root=/data/imagenet"
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.overrides = argv[split + 1:]
    with one_line_errors():
        table = load_table(args.table)
        if args.preset not in table["presets"]:
            raise VimexpError(f"{args.table} has no preset {args.preset!r}: choose {', '.join(table['presets'])}")
        start = time.time()
        if not args.render_only:
            run_missing(table, args.preset, args.runs, args.overrides, args.force,
                        args.rows.split(",") if args.rows else None, args.tasks.split(",") if args.tasks else None)
        markdown, rows = render(table, args.preset, find_results(args.runs, table, args.preset, args.overrides))
        stem = args.out / f"{args.table}_{args.preset}"
        found, total = filled(rows), sum(not r.get("cited") for r in table["rows"])
        if not found:
            raise VimexpError(f"no finished run of {args.table} ({args.preset}) under {args.runs} made with "
                              f"{' '.join(args.overrides) or 'no overrides'} after --: `make {args.table}` runs them, "
                              "or point --runs at where they are and give the overrides they were made with")
        before = filled(_read_csv(stem.with_suffix(".csv")))
        if found < before:
            raise VimexpError(f"{found} of {total} rows found, but {stem}.csv has {before}: not overwritten (point "
                              "--runs at all the runs, or --out elsewhere)")
        if found < total:
            print(f"{found} of {total} rows found; `make {args.table}` runs the rest")
        args.out.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(markdown)
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(markdown)
        print(f"{args.table} ({args.preset}) in {time.time() - start:.0f} s: {stem}.md, {stem}.csv")


if __name__ == "__main__":
    main()
