"""The exponential rate of the special-function units: a kernel of independent exp2 chains, nothing else."""
import torch
import triton
import triton.language as tl


@triton.jit
def chains(X, ITERS: tl.constexpr):
    i = tl.program_id(0) * 128 + tl.arange(0, 128)
    a = tl.load(X + i)
    b, c, d, e, f, g, h = a + 0.1, a + 0.2, a + 0.3, a + 0.4, a + 0.5, a + 0.6, a + 0.7
    for _ in range(ITERS):
        a, b, c, d = tl.exp2(a * -0.7), tl.exp2(b * -0.7), tl.exp2(c * -0.7), tl.exp2(d * -0.7)
        e, f, g, h = tl.exp2(e * -0.7), tl.exp2(f * -0.7), tl.exp2(g * -0.7), tl.exp2(h * -0.7)
    tl.store(X + i, a + b + c + d + e + f + g + h)


sms = torch.cuda.get_device_properties(0).multi_processor_count
for per_sm in (16, 64):
    grid, iters = sms * per_sm, 4096
    x = torch.rand(grid * 128, device="cuda")
    chains[(grid,)](x, iters, num_warps=4)
    torch.cuda.synchronize()
    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        chains[(grid,)](x, iters, num_warps=4)
    t.record()
    torch.cuda.synchronize()
    sec = s.elapsed_time(t) / 1e3 / 5
    n = grid * 128 * 8 * iters
    print(f"{per_sm * 4} warps/SM: {n / sec / 1e12:.2f} T exp2/s = {n / sec / sms / 1.98e9:.1f} per SM per clock at 1.98 GHz")
