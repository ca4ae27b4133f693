"""torch.profiler over 3 forwards of Vim-Ti 1248 px batch 8 bf16, kernel=fused and kernel=cuda: ms of kernels a batch."""
import torch
from torch.profiler import ProfilerActivity, profile
from vimexp.bench import spin_up
from vimexp.models import create_model

spin_up(torch.device("cuda"), 3)
for kernel in ("fused", "cuda"):
    model = create_model("vim_ti", img_size=1248, kernel=kernel).cuda().eval()
    x = torch.randn(8, 3, 1248, 1248, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 3e3
    print(f"== {kernel}: {total:.2f} ms of kernels per batch of 8")
    for e in events[:14]:
        print(f"  {e.device_time_total / 3e3:7.3f} ms  {e.count // 3:4d}x  {e.key[:110]}")
    del model
