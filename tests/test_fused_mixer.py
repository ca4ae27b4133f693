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
from vimexp.ops import KernelBackend, fused_mixer  # noqa: E402

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


def _mixers(seed=0, d_model=8):
    torch.manual_seed(seed)
    ref = VimMixer(d_model, kernel="torch").double()
    with torch.no_grad():  # away from the init's symmetries: every parameter perturbed
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused = copy.deepcopy(ref).float().to(DEVICE)
    fused.backend = KernelBackend("fused")
    return ref, fused


def rel(a, b) -> float:
    return ((a.detach().double().cpu() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch, length, d_model", [(2, 19, 8), (1, 3, 6)])
def test_training_path_matches_float64_reference(small_blocks, batch, length, d_model):
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
@pytest.mark.parametrize("batch, length, d_model", [(3, 19, 8), (1, 2, 6)])  # 12 channels: partly filled blocks
def test_inference_path_matches_float64_reference(small_blocks, monkeypatch, chunk, batch, length, d_model):
    for table in (fused_mixer.SEQ, fused_mixer.SEQ_LONG):
        monkeypatch.setitem(table, "CL", chunk)
    ref, fused = _mixers(seed=1, d_model=d_model)
    x = torch.randn(batch, length, d_model, dtype=torch.float64)
    with torch.no_grad():
        assert rel(fused(x.float().to(DEVICE)), ref(x)) <= TOL


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_fused_without_gpu_says_why():
    with pytest.raises(VimexpError, match="kernel='fused' can't run: torch sees no CUDA GPU"):
        create_model("vim_nano", kernel="fused")


@pytest.mark.parametrize("capability, expected", [((9, 0), "fused"), ((8, 0), "cuda")])
def test_auto_runs_the_triton_mixer_on_hopper_only(monkeypatch, capability, expected):
    """The policy behind kernel=auto: the Triton mixer where it was measured faster, training and inference (sm_90)."""
    import vimexp.ops as ops
    monkeypatch.setattr(ops, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    assert ops.resolve_kernel("auto") == expected
    assert ops.resolve_kernel("fused") == "fused"


def test_fused_on_an_old_gpu_says_why(monkeypatch):
    import vimexp.ops as ops
    monkeypatch.setattr(ops, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (7, 5))
    with pytest.raises(VimexpError, match=r"kernel='fused_inference' can't run: its Triton kernels need compute"):
        ops.resolve_kernel("fused_inference")


def test_state_size_the_kernels_cannot_tile():
    with pytest.raises(VimexpError, match="power-of-two d_state, not 12"):
        VimMixer(8, d_state=12, kernel=KernelBackend("fused"))
    assert VimMixer(8, d_state=12, kernel=KernelBackend("fused_inference")).kernel == "cuda"  # falls back quietly
    assert VimMixer(8, d_state=12, kernel=KernelBackend("fused", strict=False)).kernel == "cuda"  # as auto's does


def test_auto_falls_back_to_mamba_ssm_where_triton_cannot_build(monkeypatch):
    import vimexp.ops as ops
    monkeypatch.setattr(ops, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
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


def test_size_guard_counts_every_buffer():
    assert fused_mixer.fits(128, 197, 768, 16, 24)
    assert not fused_mixer.fits(1000, 1025, 768, 64, 24)  # the state checkpoints overflow first at d_state 64
    assert not fused_mixer.fits(65536, 17, 384, 16, 12)  # more programs than a grid axis takes


def test_no_second_derivative_through_hand_written_gradients(small_blocks):
    _, fused = _mixers()
    x = torch.randn(1, 5, 8, device=DEVICE, requires_grad=True)
    (gx,) = torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()
