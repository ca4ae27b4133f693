"""SEQ_LONG's chunk length and register cap at Vim-Ti 1248 px batch 8: the inference scan alone and the mixer."""
import json
import sys

import torch

from vimexp.bench import spin_up
from vimexp.bench_mixer import SHAPES, mixer_steps, scan_kernel_alone, time_ms
from vimexp.ops import fused_mixer as fm

spin_up(torch.device("cuda"), 3)
shape = SHAPES["vim_ti_1248_b8"]
rows = []
for rep in range(2):
    for cl in (128, 256, 384, 512):
        for mr in (None, 80):
            cfg = dict(BD=32, CL=cl, num_warps=1) | ({"maxnreg": mr} if mr else {})
            fm.SEQ_LONG.clear()
            fm.SEQ_LONG.update(cfg)
            try:
                r = scan_kernel_alone(shape)
                infer, _ = mixer_steps("fused", shape)
                rows.append({**cfg, "rep": rep, "scan_ms": r["ms"], "mixer_ms": time_ms(infer)})
            except Exception as e:
                rows.append({**cfg, "rep": rep, "error": str(e)[:300]})
            print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
ok = [r for r in rows if "scan_ms" in r]
key = lambda r: (r["CL"], r.get("maxnreg"))
best = min({key(r) for r in ok}, key=lambda k: sum(r["scan_ms"] for r in ok if key(r) == k))
print("best", best)
open("/tmp/best", "w").write(f"{best[0]} {best[1] or 0}")
