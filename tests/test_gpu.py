"""cuda (mamba-ssm + causal-conv1d) vs torch kernel paths on the GPU: same weights, same numbers.

Run on a GPU machine with `make gpu-test`; writes experiments/results/gpu_check.json.
"""
import datetime
import json
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vimexp.models import create_model
from vimexp.ops import cuda_unavailable_reason, fused_mixer
from vimexp.record import git_commit

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cuda_unavailable_reason() is not None, reason=str(cuda_unavailable_reason()))]
RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results" / "gpu_check.json"
TOL = {"float32": 1e-4, "bf16_autocast": 2e-2}
checks = []


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "mamba_ssm": version("mamba_ssm"),
        "causal_conv1d": version("causal_conv1d"), "date": datetime.date.today().isoformat(), "commit": git_commit(),
        "command": "make gpu-test", "metric": "relative error ||path - reference|| / ||reference|| per tensor (logits, every parameter gradient); kernels: [path, reference], cuda vs torch unless named",
        "tolerance": TOL, "checks": checks}, indent=2) + "\n")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _grads_and_logits(model, x, target, precision):
    torch.manual_seed(1)  # the same draw for stochastic variants (bidirectional='sequence' flips at random)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        logits = model(x)
    F.cross_entropy(logits.float(), target).backward()  # a training step's loss: coherent gradients
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare(name, precision, batch=8, kernels=("cuda", "torch"), **kwargs):
    """kernels: (path under test, reference path)."""
    torch.manual_seed(0)
    cuda = create_model(name, kernel=kernels[0], drop_path_rate=0.0, **kwargs).cuda().train()
    ref = create_model(name, kernel=kernels[1], drop_path_rate=0.0, **kwargs).cuda().train()
    ref.load_state_dict(cuda.state_dict())
    size = cuda.patch_embed.img_size
    x = torch.randn(batch, 3, *size, device="cuda")
    target = torch.randint(0, cuda.num_classes, (batch,), device="cuda")
    logits_c, grads_c = _grads_and_logits(cuda, x, target, precision)
    logits_t, grads_t = _grads_and_logits(ref, x, target, precision)
    errs = {n: rel_err(grads_c[n], grads_t[n]) for n in grads_c}
    worst = max(errs, key=errs.get)
    result = {"model": name, "kernels": list(kernels), "overrides": kwargs, "precision": precision, "batch": batch, "loss": "cross_entropy",
              "logits_rel_err": rel_err(logits_c, logits_t), "worst_grad": worst, "worst_grad_rel_err": errs[worst],
              "median_grad_rel_err": sorted(errs.values())[len(errs) // 2], "params_compared": len(errs)}
    if precision == "bf16_autocast":  # how far bf16 itself moves each path from its float32 result
        _, fp32_c = _grads_and_logits(cuda, x, target, "float32")
        _, fp32_t = _grads_and_logits(ref, x, target, "float32")
        result["bf16_vs_fp32_worst_grad_rel_err"] = {
            kernels[0]: max(rel_err(grads_c[n], fp32_c[n]) for n in errs),
            kernels[1]: max(rel_err(grads_t[n], fp32_t[n]) for n in errs)}
    # In bf16 each path lands within its own rounding noise of its float32 result (measured just above), and two
    # such results can differ by the sum of the two: the gradient tolerance is the larger of TOL and that sum.
    # Checked on top, so that a noisy path can't widen its own tolerance: its noise is at most 1.5x the reference's
    # (or TOL). Measured on the H100, the worst gradient's bf16-vs-fp32 error is 0.018-0.025 for both paths.
    floors = result.get("bf16_vs_fp32_worst_grad_rel_err", {})
    result["grad_tolerance"] = max(TOL[precision], sum(floors.values()))
    checks.append(result)
    if floors:
        assert floors[kernels[0]] <= 1.5 * max(TOL[precision], floors[kernels[1]]), result
    assert result["logits_rel_err"] <= TOL[precision], result
    assert result["worst_grad_rel_err"] <= result["grad_tolerance"], result


@pytest.mark.parametrize("precision", ["float32", "bf16_autocast"])
def test_full_vim_ti_agrees(precision):
    _compare("vim_ti", precision)


@pytest.mark.parametrize("precision", ["float32", "bf16_autocast"])
def test_recomputing_mixer_agrees(precision):  # the fused one-node-per-direction cuda path (recompute=True)
    _compare("vim_ti", precision, recompute=True)


@pytest.mark.parametrize("variant", [dict(bidirectional="none", pool="mean"), dict(bidirectional="ssm", pool="head"),
                                     dict(bidirectional="block", pool="double"), dict(bidirectional="sequence", pool="max")])
def test_ablation_variants_agree(variant):
    _compare("vim_ti", "float32", depth=4, **variant)


@pytest.mark.parametrize("precision", ["float32", "bf16_autocast"])
@pytest.mark.parametrize("pool", ["middle", "mean"])  # the odd-length rule; every token turned (the dense backbones)
@pytest.mark.parametrize("kernel", ["fused", "cuda"])
def test_rope_agrees_with_torch(kernel, pool, precision):  # RoPE between the layers, on every kernel path
    _compare("vim_ti", precision, kernels=(kernel, "torch"), pool=pool, rope=True, rope_residual=True)


@pytest.mark.parametrize("precision", ["float32", "bf16_autocast"])
@pytest.mark.parametrize("name", ["vim_ti", "vim_s"])
def test_fused_mixer_agrees_with_mamba_ssm(name, precision):  # kernel=fused (Triton) against the mamba-ssm path
    _compare(name, precision, kernels=("fused", "cuda"))


@pytest.mark.parametrize("precision", ["float32", "bf16_autocast"])
@pytest.mark.parametrize("name, img_size, batch", [("vim_ti", 224, 8), ("vim_s", 224, 8), ("vim_ti", 1248, 2),
                                                   ("vim_ti", 1248, 64)])  # 64: one launch of the one-pass scan
def test_fused_inference_agrees_with_mamba_ssm(name, img_size, batch, precision):
    """Eval-mode logits without autograd, where kernel=fused runs its inference kernels."""
    torch.manual_seed(0)
    models = [create_model(name, kernel=k, img_size=img_size).cuda().eval() for k in ("fused", "cuda")]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(batch, 3, img_size, img_size, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        logits = [m(x) for m in models]
    err = rel_err(*logits)
    checks.append({"model": name, "img_size": img_size, "batch": batch, "kernels": ["fused", "cuda"],
                   "mode": "inference", "precision": precision, "logits_rel_err": err})
    assert err <= TOL[precision], err


@pytest.mark.parametrize("config", [0, 1, 2])  # fused_mixer.LANES["CONFIGS"]
@pytest.mark.parametrize("batch", [8, 64])
def test_one_pass_scan_agrees_with_the_two_pass_scan(config, batch):
    """The inference scan (scan_one_pass) in each of its launch configurations against the training forward's
    two-pass scan, float32, at Vim-Ti's 1248 px shapes with random inputs in the range the model sees."""
    from vimexp.ops import scan_one_pass
    torch.manual_seed(0)
    length, e, n = 6085, 384, 16
    xc, dt = torch.randn(2, batch * length, e, device="cuda"), torch.randn(2, batch * length, e, device="cuda") - 4
    xz, bc = torch.randn(batch * length, 2 * e, device="cuda"), torch.randn(2, batch * length, 2 * n, device="cuda")
    A = -torch.rand(2, e, n, device="cuda") * 15 - 1
    D, bias = torch.randn(2, e, device="cuda"), torch.randn(2, e, device="cuda")
    two_pass = fused_mixer.scan_seq(xc, bc, dt, xz[:, e:], A.transpose(1, 2).contiguous(), D, bias, batch)[0]
    one_pass = scan_one_pass.scan_one_pass(xc, scan_one_pass.padded_bc(bc), dt, xz[:, e:], A, D, bias, batch,
                                           fused_mixer.LANES["CONFIGS"][config])
    err = rel_err(one_pass, two_pass)
    checks.append({"op": "scan_one_pass_vs_scan_seq", "config": config, "batch": batch, "length": length,
                   "precision": "float32", "rel_err": err})
    assert err <= TOL["float32"], err


# (128, 197, 192): Vim-Ti's training batch, whose backward scan launches register-capped on a 132-SM GPU such as
# the H200 (one wave; backward_maxnreg in the record says whether it did)
@pytest.mark.parametrize("shape", [(2, 6085, 192), (16, 197, 384), (4, 730, 192), (128, 197, 192)])
def test_fused_mixer_random_weights_at_vim_shapes(shape):
    """One bimamba v2 mixer with every parameter perturbed, fused vs mamba-ssm, float32: output and all gradients."""
    from vimexp.models.vim import VimMixer
    torch.manual_seed(0)
    batch, length, dim = shape
    mixers = [VimMixer(dim, kernel=k).cuda() for k in ("fused", "cuda")]
    with torch.no_grad():
        for p in mixers[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mixers[1].load_state_dict(mixers[0].state_dict())
    x = torch.randn(batch, length, dim, device="cuda")
    g = torch.randn_like(x)
    outs, grads = [], []
    for m in mixers:
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(g)
        outs.append(out.detach())
        grads.append({"x": xi.grad, **{n: p.grad for n, p in m.named_parameters()}})
    with torch.no_grad():  # the inference kernels (channel-last, one step at a time) as well
        inference = [m(x) for m in mixers]
    err = {"out": rel_err(*outs), "out_inference": rel_err(*inference),
           **{k: rel_err(grads[0][k], grads[1][k]) for k in grads[1]}}
    maxnreg = fused_mixer._seq_launch(batch, length, 2 * dim, backward=True)[0].get("maxnreg")
    checks.append({"op": "fused_mixer_vs_cuda", "shape": list(shape), "precision": "float32",
                   "backward_maxnreg": maxnreg, "rel_err": err})
    assert max(err.values()) <= TOL["float32"], err


def test_selective_scan_matches_mamba_at_vim_shapes():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    from vimexp.ops.selective_scan import selective_scan_torch
    torch.manual_seed(0)
    b, e, n, L = 8, 384, 16, 197
    args = [torch.randn(b, e, L), torch.randn(b, e, L) * 0.5, -torch.rand(e, n) * 15 - 1, torch.randn(b, n, L),
            torch.randn(b, n, L), torch.randn(e), torch.randn(b, e, L), torch.randn(e)]
    args = [a.cuda().requires_grad_() for a in args]
    outs, grads = [], []
    for fn in (selective_scan_fn, selective_scan_torch):
        out = fn(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True)
        g = torch.autograd.grad(out.sum(), args)
        outs.append(out)
        grads.append(g)
    err = {"out": rel_err(outs[0], outs[1]), **{f"grad_{k}": rel_err(a, b) for k, a, b in
                                                 zip("u delta A B C D z delta_bias".split(), *grads)}}
    checks.append({"op": "selective_scan", "shape": [b, e, n, L], "precision": "float32", "rel_err": err})
    assert max(err.values()) <= TOL["float32"], err


def test_hier_vim_t_agrees():
    _compare("hier_vim_t", "float32", batch=4)
