"""How the Triton kernels' torch.library custom ops are called.

torch.compile and torch.export need each fused op as a custom op (one graph node, a fake implementation, its
autograd formula). Called eagerly, though, a custom op costs about 0.5 ms of host time in torch's Python dispatch
(H200 host, torch 2.11): the 98 calls of a fused Vim-Ti training step at batch 128 (24 mixers and 25 norms, forward
and backward) made the step wait on the host. `eager_fast` runs the op's implementation through a plain
autograd.Function with the op's own setup_context and backward instead, and the op itself only while compiling or
exporting: the same kernels and formulas either way. Its backward is handed None, not zeros, for an output that
got no gradient (the ops' backwards take None): the mixer's eight outputs kept for its backward had cost eight
fills a layer.
"""
import torch


def eager_fast(op, impl, setup_context, backward, differentiable: int):
    """`op` (a custom op over `impl`, with register_autograd(backward, setup_context)) as a callable that skips the
    custom-op dispatch in eager mode. The first `differentiable` outputs carry gradients; setup_context sees
    ctx.eager = True, so that `backward` can call its backward op's implementation directly too."""
    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return impl(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.eager = True
            setup_context(ctx, inputs, output)
            ctx.mark_non_differentiable(*output[differentiable:])
            ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs kept for the backward

        @staticmethod
        @torch.autograd.function.once_differentiable  # hand-written gradients: a second derivative raises
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else Eager.apply(*args)
    return call
