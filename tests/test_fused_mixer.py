"""kernel="fused" (vimexp.ops.fused_mixer) against the plain PyTorch mixer in float64, at tiny sizes with blocks
smaller than the sequence (several chunks, a ragged last one). On a CPU the Triton kernels run in Triton's
interpreter; on a GPU natively. The comparison with mamba-ssm at Vim's real shapes is in tests/test_gpu.py."""
import copy

import pytest
import torch

pytest.importorskip("triton")

from vimexp import VimexpError  # noqa: E402
from vimexp.models import create_model  # noqa: E402
from vimexp.models.vim import VimMixer  # noqa: E402
from vimexp.ops import KernelBackend, cuda_unavailable_reason, fused_mixer  # noqa: E402

# Without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 (Triton's CPU interpreter) before torch loaded.

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-4  # float32 kernels against a float64 reference


@pytest.fixture
def small_blocks(monkeypatch):
    for table, values in ((fused_mixer.CONV_BLOCK, dict(BE=8, BT=16)),
                          (fused_mixer.CONV_DPRE, dict(BE=8, BT=4, SEG=8)),
                          (fused_mixer.SEQ, dict(BD=8, CL=5)), (fused_mixer.SEQ_LONG, dict(BD=4, CL=5)),
                          (fused_mixer.SEQ_BWD, dict(BD=4))):
        for key, value in values.items():
            monkeypatch.setitem(table, key, value)


def _mixers(seed=0, d_model=8, d_state=16):
    torch.manual_seed(seed)
    ref = VimMixer(d_model, d_state=d_state, kernel="torch").double()
    with torch.no_grad():  # away from the init's symmetries: every parameter perturbed
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(ref).float().to(DEVICE)
    fused.backend = KernelBackend("fused")
    return ref, fused


def rel(a, b) -> float:
    return ((a.detach().double().cpu() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch, length, d_model, one_pass", [(2, 19, 8, False), (2, 19, 8, True), (1, 3, 6, False)])
def test_training_path_matches_float64_reference(small_blocks, monkeypatch, batch, length, d_model, one_pass):
    monkeypatch.setitem(fused_mixer.SEQ_LONG, "ONE_PASS", 1 if one_pass else 10 ** 9)  # 19 tokens: 4 chunks, or 1
    ref, fused = _mixers(d_model=d_model)
    x = torch.randn(batch, length, d_model, dtype=torch.float64, requires_grad=True)
    xf = x.detach().float().to(DEVICE).requires_grad_()
    g = torch.randn(batch, length, d_model, dtype=torch.float64)
    y = ref(x)
    (y * g).sum().backward()
    out = fused(xf)
    (out * g.float().to(DEVICE)).sum().backward()
    errors = {"out": rel(out, y), "x": rel(xf.grad, x.grad),
              **{n: rel(q.grad, p.grad) for (n, p), q in zip(ref.named_parameters(), fused.parameters())}}
    assert len(errors) == 2 + len(list(ref.parameters()))
    assert max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("chunk", [5, 64])  # several chunks carried into each other, and one
@pytest.mark.parametrize("batch, length, d_model, d_state", [(3, 19, 8, 16), (1, 2, 6, 16), (2, 7, 8, 8)])
def test_inference_path_matches_float64_reference(small_blocks, monkeypatch, chunk, batch, length, d_model, d_state):
    """On a GPU at 16 states through scan_one_pass (d_model 6: 12 channels, a partly filled warp), at 8 through the
    two-pass scan; on a CPU always the latter."""
    for table in (fused_mixer.SEQ, fused_mixer.SEQ_LONG):
        monkeypatch.setitem(table, "CL", chunk)
    ref, fused = _mixers(seed=1, d_model=d_model, d_state=d_state)
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    with torch.no_grad():
        assert rel(fused(x.float().to(DEVICE)), ref(x)) <= TOL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_fused_without_gpu_says_why():
    with pytest.raises(VimexpError, match="kernel='fused' can't run: torch sees no CUDA GPU"):
        create_model("vim_nano", kernel="fused")


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a CUDA machine of a given compute capability, with or without mamba-ssm."""
    import vimexp.ops as ops

    def make(capability, mamba=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
        monkeypatch.setattr(ops, "cuda_unavailable_reason", lambda: None if mamba else "import mamba_ssm failed")
        return ops
    return make


@pytest.mark.parametrize("capability, mamba, expected", [((9, 0), True, "fused"), ((8, 0), True, "cuda"),
                                                         ((9, 0), False, "fused"), ((8, 0), False, "fused"),
                                                         ((7, 5), True, "cuda"), ((7, 5), False, "torch")])
def test_auto_policy(gpu, capability, mamba, expected):
    """kernel=auto: the Triton kernels where they were measured faster (sm_90) and wherever mamba-ssm is missing
    (8.0+); mamba-ssm on the other GPUs; PyTorch on an old GPU without it."""
    assert gpu(capability, mamba).resolve_kernel("auto") == expected


def test_fused_needs_no_mamba_ssm(gpu):
    ops = gpu((9, 0), mamba=False)
    assert ops.resolve_kernel("fused") == "fused"
    with pytest.raises(VimexpError, match=r"kernel='cuda' can't run: import mamba_ssm failed; use `pip install"):
        ops.resolve_kernel("cuda")


def test_fused_on_an_old_gpu_says_why(gpu):
    with pytest.raises(VimexpError, match=r"kernel='fused_inference' can't run: its Triton kernels need compute"):
        gpu((7, 5)).resolve_kernel("fused_inference")


@pytest.mark.parametrize("mamba, reference", [(True, "cuda"), (False, "torch")])
def test_state_size_the_kernels_cannot_tile(gpu, mamba, reference):
    gpu((9, 0), mamba)
    with pytest.raises(VimexpError, match="power-of-two d_state, not 12"):
        VimMixer(8, d_state=12, kernel=KernelBackend("fused"))
    assert VimMixer(8, d_state=12, kernel=KernelBackend("fused_inference")).kernel == reference  # quietly
    assert VimMixer(8, d_state=12, kernel=KernelBackend("fused", strict=False)).kernel == reference  # as auto's does


def test_auto_falls_back_to_mamba_ssm_where_triton_cannot_build(gpu, monkeypatch):
    ops = gpu((9, 0))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(ops.shutil, "which", lambda name: None)
    assert ops.resolve_kernel("auto") == "cuda"
    with pytest.raises(VimexpError, match="no C compiler"):
        ops.resolve_kernel("fused")


def test_softplus_keeps_its_digits_far_below_zero():
    """delta = softplus(dt + bias) in the kernels, against float64, over the range training can push dt into. The
    bound grows as 1 + |x|: rounding x log2(e) to float32 costs e^x a relative |x| 2^-24 whatever computes it (the
    GPU's exponential included); near 0 it is the polynomial's 1.9e-7."""
    import triton
    import triton.language as tl

    @triton.jit
    def apply(X, Y, SIZE: tl.constexpr):
        i = tl.arange(0, SIZE)
        tl.store(Y + i, fused_mixer._softplus(tl.load(X + i)))
    x = torch.linspace(-40, 40, 256, device=DEVICE)
    y = torch.empty_like(x)
    apply[(1,)](x, y, 256)
    expected = torch.nn.functional.softplus(x.double().cpu())
    assert ((y.double().cpu() - expected).abs() / expected / (1 + x.double().cpu().abs())).max() < 2.5e-7


def test_launch_size_counts_every_buffer():
    assert fused_mixer.max_batch(197, 768, 16, 24) >= 128  # Vim-B training at 224 px: one launch
    assert fused_mixer.max_batch(6085, 384, 16, 12) == 2 ** 31 // (2 * 384 * 16 * (6085 // 2))  # 1248 px: the scratch
    assert fused_mixer.max_batch(2, 16, 16, 1) == 2 ** 16 - 1  # tiny mixers: the grid axis


def test_long_sequences_run_one_pass_where_the_batch_fills_the_gpu():
    """Two passes over chunks where the batch is too small to fill the GPU; one pass where batch x directions x
    channel blocks reach ONE_PASS programs (its chunk is then the whole sequence)."""
    one_pass = fused_mixer.SEQ_LONG["ONE_PASS"]
    bd = fused_mixer.SEQ_LONG["BD"]
    large = -(-one_pass // (2 * (384 // bd)))  # the smallest batch with ONE_PASS programs
    small = large - 1
    assert fused_mixer._seq_launch(small, 6085, 384)[2] == -(-6085 // fused_mixer.SEQ_LONG["CL"])
    assert fused_mixer._seq_launch(large, 6085, 384)[1:3] == (6085, 1)
    assert fused_mixer._seq_launch(large, 197, 384)[2] == 1  # short sequences: one chunk at any batch


@pytest.mark.parametrize("max_elements, max_grid", [(2 * 16 * 16 * (19 // 2) * 2 + 1, 2 ** 16 - 1), (2 ** 31 - 1, 11)])
def test_batch_too_large_for_one_launch_runs_as_several(small_blocks, monkeypatch, max_elements, max_grid):
    """A batch beyond the 32-bit offsets (or the grid) runs fused in sub-batches, and gives the one-launch numbers."""
    ref, fused = _mixers(d_model=8)
    x = torch.randn(5, 19, 8, dtype=torch.float64, requires_grad=True)
    xf = x.detach().float().to(DEVICE).requires_grad_()
    expected = ref(x)
    expected.square().sum().backward()
    monkeypatch.setattr(fused_mixer, "MAX_ELEMENTS", max_elements)
    monkeypatch.setattr(fused_mixer, "MAX_GRID_AXIS", max_grid)
    assert fused_mixer.max_batch(19, 16, 16, 1) == 2  # 5 = 2 + 2 + 1
    out = fused(xf)
    out.square().sum().backward()
    assert max(rel(out, expected), rel(xf.grad, x.grad), rel(fused.A_log.grad, ref.A_log.grad)) <= TOL


def test_no_second_derivative_through_hand_written_gradients(small_blocks):
    _, fused = _mixers()
    x = torch.randn(1, 5, 8, device=DEVICE, requires_grad=True)
    (gx,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # eager: once_differentiable's message
        gx.sum().backward()


# ------------------------------------------------------------------- the Triton add + RMSNorm, the ops, the model
@pytest.mark.parametrize("residual, prenorm, residual_in_fp32, shape, scale", [
    (True, True, True, (2, 7, 24), False), (False, True, True, (2, 7, 24), False),
    (True, False, True, (2, 7, 24), False), (False, False, False, (2, 7, 24), False),
    (True, True, True, (3, 7, 24), True), (False, False, False, (3, 7, 24), True),
    (True, True, True, (2, 37, 1000), True)])  # 4 programs of 19 rows, 2 a step (the last half-empty), cols masked
def test_rms_norm_matches_float64_reference(residual, prenorm, residual_in_fp32, shape, scale, monkeypatch):
    """vimexp::rms_norm (float32 kernels) against the PyTorch norm in float64: outputs and every gradient, with
    and without drop path's factors a sample (one of them 0)."""
    from vimexp.ops import fused_norm
    from vimexp.ops.fused_norm import rms_norm_triton
    from vimexp.ops.norm import rms_norm_torch
    monkeypatch.setattr(fused_norm, "BWD_PROGRAMS", 4)
    torch.manual_seed(0)
    x, r = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(shape[-1], dtype=torch.float64)
    grads = torch.randn(2, *shape, dtype=torch.float64)
    x_scale = torch.tensor([0.0, 1.25, 1.25][:shape[0]], dtype=torch.float64) if scale else None
    results = {}
    for name, norm, dtype in (("triton", rms_norm_triton, torch.float32), ("ref", rms_norm_torch, torch.float64)):
        device = DEVICE if name == "triton" else "cpu"
        inputs = [t.to(device, dtype).requires_grad_() for t in (x, r if residual else None, w) if t is not None]
        xi, ri, wi = inputs if residual else (inputs[0], None, inputs[1])
        outs = norm(xi, wi, residual=ri, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                    x_scale=None if x_scale is None else x_scale.to(device, dtype))
        outs = outs if prenorm else (outs,)
        sum((o * g.to(o)).sum() for o, g in zip(outs, grads)).backward()
        results[name] = [o.detach() for o in outs] + [t.grad for t in inputs]
    assert len(results["triton"]) == (2 if prenorm else 1) + (3 if residual else 2)
    errors = [rel(a, b) for a, b in zip(results["triton"], results["ref"])]
    assert max(errors) < 1e-5, errors


def test_custom_ops_pass_torch_opcheck(small_blocks):
    """Schema, fake (meta) implementation, autograd registration and torch.compile tracing of the fused ops."""
    from vimexp.ops.fused_norm import _rms_norm
    x, w = torch.randn(5, 16, device=DEVICE, requires_grad=True), torch.randn(16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(_rms_norm, (x, None, None, w, 1e-5, True))
    torch.library.opcheck(_rms_norm, (x, torch.rand(5, device=DEVICE), torch.randn(5, 16, device=DEVICE), w, 1e-5,
                                      True))
    _, fused = _mixers(d_model=4)
    m, batch, length = fused, 2, 7
    e = m.in_proj.out_features // 2
    pair = lambda a, b: torch.stack([a, b]).detach().requires_grad_()  # noqa: E731
    args = (torch.randn(batch * length, 2 * e, device=DEVICE, requires_grad=True), batch,
            pair(m.conv1d.weight.squeeze(1), m.conv1d_b.weight.squeeze(1)), pair(m.conv1d.bias, m.conv1d_b.bias),
            pair(m.x_proj.weight, m.x_proj_b.weight), pair(m.dt_proj.weight, m.dt_proj_b.weight),
            pair(-torch.exp(m.A_log), -torch.exp(m.A_b_log)), pair(m.D, m.D_b), pair(m.dt_proj.bias, m.dt_proj_b.bias),
            "")
    torch.library.opcheck(fused_mixer._mixer_forward, args, test_utils=("test_schema", "test_faketensor",
                                                                        "test_autograd_registration"))


def _model_pair(depth=2, **kwargs):
    torch.manual_seed(0)
    ref = create_model("vim_nano", kernel="torch", depth=depth, embed_dim=16, **kwargs).double().eval()
    model = create_model("vim_nano", kernel=KernelBackend("fused"), depth=depth, embed_dim=16, **kwargs).to(DEVICE)
    model.load_state_dict(ref.state_dict())
    return ref, model.eval()


def test_whole_model_on_the_fused_path_matches_float64():
    """Every kernel of a fused Vim (the Triton norms between the Triton mixers): logits and gradients."""
    ref, model = _model_pair()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ref(x).square().sum().backward()
    out = model(x.float().to(DEVICE))
    out.square().sum().backward()
    errors = {"logits": rel(out, ref(x).detach()),
              **{n: rel(q.grad, p.grad) for (n, p), q in zip(ref.named_parameters(), model.parameters())}}
    assert max(errors.values()) < TOL, errors


def test_drop_path_in_the_norm_draws_and_applies_timms_drop_path():
    """Training with drop path: the fused model (its norms apply the factors) against the PyTorch model whose blocks
    call timm's drop_path on the hidden states before the norm, from the same seed: same logits, same gradients."""
    from timm.layers import drop_path

    from vimexp.models import vim
    ref, model = _model_pair(depth=4, drop_path_rate=0.6)
    ref.to(DEVICE).train(), model.train()  # one device: one generator
    scale_calls = []

    def timm_scale(x, module):  # the reference: timm's own function applied to ones, drawn in the fused dtype
        if not isinstance(module, vim.DropPath) or not module.training or module.drop_prob == 0:
            return None
        scale_calls.append(module.drop_prob)
        ones = torch.ones(x.shape, device=x.device, dtype=torch.float32)
        return drop_path(ones, module.drop_prob, True, module.scale_by_keep)[:, 0, 0].to(x.dtype)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    results = {}
    for name, net, patch in (("fused", model, False), ("timm", ref, True)):
        with pytest.MonkeyPatch.context() as mp:
            if patch:
                mp.setattr(vim, "drop_path_scale", timm_scale)
            torch.manual_seed(5)
            weight = next(net.parameters())
            out = net(x.to(weight.device, weight.dtype))
        out.square().sum().backward()
        results[name] = [out] + [p.grad for p in net.parameters()]
    assert scale_calls == pytest.approx([0.2, 0.4, 0.6])  # blocks 2 and 3 (0 and 1 drop at 0), then the final norm
    errors = [rel(a, b.detach().cpu()) for a, b in zip(results["fused"], results["timm"])]
    assert max(errors) < TOL, errors
    torch.manual_seed(6)
    assert not torch.equal(model(x.float().to(DEVICE)), results["fused"][0]), "another seed, other draws"


@pytest.mark.skipif(torch.cuda.is_available() and cuda_unavailable_reason() is None,
                    reason="mamba-ssm is installed: the variant runs on its kernels")
def test_variant_without_a_triton_kernel_says_so_once(capfd):
    """bimamba 'none' (Table 4) on kernel=fused without mamba-ssm: plain PyTorch, and one line that says so."""
    ref, model = _model_pair(bidirectional="none")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(model(x.to(DEVICE)), ref(x.double())) < TOL
        model(x.to(DEVICE))
    notes = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note: kernel=fused")]
    assert len(notes) == 1 and "plain PyTorch" in notes[0], notes


def test_export_and_compile_see_the_fused_ops():
    """torch.export of a fused Vim gives a graph with the ops as single nodes and the eager logits; torch.compile
    (fullgraph, so a graph break fails) trains through them."""
    _, model = _model_pair()
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        nodes = [str(n.target) for n in exported.graph.nodes]
        assert nodes.count("vimexp.bimixer_scan_inference.default") == 2 and nodes.count("vimexp.rms_norm.default") == 3
        assert torch.equal(exported.module()(x), expected)
    compiled = torch.compile(model.train(), backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(eager, model.parameters()))


def test_compile_option_compiles_the_model_in_place(tmp_path):
    """`compile=true`: the task's model is compiled in place, so its checkpoint keys stay the model's own."""
    from conftest import compose_cfg
    from vimexp.build import build_task
    plain, compiled = (build_task(compose_cfg([f"compile={flag}"], tmp_path)) for flag in ("false", "true"))
    assert compiled.model._compiled_call_impl is not None and plain.model._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_exported_vim_ti_gives_the_eager_logits():
    """An exported Vim-Ti on the fused kernels (the deployable graph) against the eager model, at its real size."""
    model = create_model("vim_ti", kernel="fused").cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        expected = model(x)
        got = torch.export.export(model, (x,)).module()(x)
    error = rel(got, expected.double().cpu())
    print(f"exported Vim-Ti vs eager (float32): relative max difference {error:.2e}")
    assert error <= 1e-6


_COMPILE_ONE_PASS = """
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from vimexp.ops import fused_mixer, scan_one_pass as sop
cfg = dict(fused_mixer.LANES["CONFIGS"][int(sys.argv[1])])
warps = cfg.pop("num_warps")
ch, states, bc = sop.layouts(warps)
types = dict(U="*bf16", BC="*fp32", DT="*bf16", Z="*bf16", A="*fp32", D="*fp32", DTB="*fp32", Y2="*bf16", L="i32",
             B="i32", E="i32")
consts = dict(CH=ch, LS=states, LBC=bc, **cfg)
kernel = sop._scan_one_pass
signature = {name: "constexpr" if name in consts else types[name] for name in kernel.arg_names}
compiled = triton.compile(GluonASTSource(fn=kernel, signature=signature, constexprs=consts, attrs={}),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
ptx = compiled.asm["ptx"]
with tempfile.TemporaryDirectory() as tmp:
    open(os.path.join(tmp, "k.ptx"), "w").write(ptx)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    log = subprocess.run([ptxas, "-v", "-arch=sm_90a", os.path.join(tmp, "k.ptx"), "-o", os.path.join(tmp, "k.o")],
                         capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", os.path.join(tmp, "k.o")],
                          capture_output=True, text=True, check=True).stdout
# global loads issued after a store of the same loop iteration (before its branch back)
late, stored = 0, False
for line in sass.splitlines():
    stored = ("STG" in line or stored) and " BRA " not in line and "EXIT" not in line
    late += stored and "LDG" in line
print(json.dumps(dict(spill_bytes=sum(map(int, re.findall(r"(\\d+) bytes spill", log))),
                      registers=int(re.findall(r"Used (\\d+) registers", log)[0]),
                      shared=compiled.metadata.shared, barriers="bar.sync" in ptx or "barrier" in ptx,
                      shuffles=ptx.count("shfl.sync"), loads_after_a_store=late)))
"""


@pytest.mark.parametrize("config", [0, 1, 2])  # fused_mixer.LANES["CONFIGS"]
def test_one_pass_scan_compiles_for_sm90_in_registers_and_shuffles(config):
    """The inference scan (Gluon, vimexp.ops.scan_one_pass) compiled for an H100/H200 without a GPU, in a process
    without Triton's interpreter (which cannot build Gluon): no spills, no shared memory, no barrier (its lanes
    trade values by shuffles alone), which is what made it faster than the two-pass scan; and no global load after
    a store of its loop iteration in the machine code (ptxas keeps a load behind a store it may alias, and the
    register sets then load a block ahead no more: docs/optimisation.md step 41). Its numbers are checked
    on the GPU (test_inference_path_matches_float64_reference runs it there, tests/test_gpu.py at Vim's shapes)."""
    pytest.importorskip("triton.experimental.gluon")
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_ONE_PASS, str(config)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["spill_bytes"] == 0 and report["shared"] == 0 and not report["barriers"], report
    sets = fused_mixer.LANES["CONFIGS"][config]["SETS"]
    assert report["shuffles"] >= 11 * sets, report  # 8 broadcasts and 3 for the reduce-scatter, a block
    assert report["loads_after_a_store"] == 0, report  # a store ahead of them holds the next blocks' loads back
