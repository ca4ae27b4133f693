"""Redraws speedup_h200.png from the CSVs beside it: python experiments/results/fused_scan/h200/plot.py"""
import csv
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
rows = lambda name: {r["model"]: float(r["img_per_sec"]) for r in csv.DictReader(open(here / name))}  # noqa: E731
train, infer = rows("final2_train_224_r2.csv"), rows("final2_fig1_1248_b8_r3.csv")  # one call: runs.json, NOTES.md
panels = [("training, Vim-S 224 px, batch 128",
           {"mamba-ssm": train["vim_s_cuda"], "fused (kernel=auto)": train["vim_s_auto"]}),
          ("inference, Vim-Ti vs DeiT-Ti, 1248 px, batch 8",
           {"Vim-Ti mamba-ssm": infer["vim_ti_mamba_ssm"], "Vim-Ti fused": infer["vim_ti"],
            "DeiT-Ti eager": infer["deit_ti_eager"], "DeiT-Ti SDPA": infer["deit_ti_sdpa"]})]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, (title, bars) in zip(axes, panels):
    base = next(iter(bars.values()))
    ax.bar(list(bars), list(bars.values()), color=["#999", "#2a7", "#c63", "#36c"][:len(bars)])
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:.0f}\n{v / base:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set(title=title, ylabel="images / s")
    ax.margins(y=0.25)
    ax.tick_params(axis="x", labelsize=8)
fig.suptitle("H200, bf16, one device call: the fused bidirectional mixer against mamba-ssm (fused_scan/h200)")
fig.tight_layout()
fig.savefig(here / "speedup_h200.png", dpi=110)
