"""A model's training forward and backward replayed as CUDA graphs (torch.cuda.make_graphed_callables): one launch
each instead of hundreds of kernels, so the host's Python no longer bounds a step. A fused Vim-S step at batch 128
spends 71 ms of its 109 ms enqueueing kernels on the H200's host, and the CLI's loop, EMA, callbacks and loader
thread come on top (docs/optimisation.md, step 27). The optimizer, EMA and everything else stay eager."""
import inspect
from contextlib import contextmanager

import torch
from lightning.pytorch.utilities import rank_zero_info

from vimexp import VimexpError


def graph_blocker(model: torch.nn.Module, trainer) -> str | None:
    """Why the training step can't be graphed in this run (a sentence), or None."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "the model is compiled (compile=true)"
    if trainer.world_size > 1:
        return "DDP (its gradient hooks would all fire at the graph's end, with no overlap of communication)"
    if trainer.accumulate_grad_batches > 1:
        return "trainer.accumulate_grad_batches > 1 (graph-owned gradients can't be accumulated into)"
    if getattr(model, "flip_sequence", False):
        return "bidirectional=sequence (each forward draws its flip on the host: a graph would replay one draw)"
    return None


class GraphedTraining:
    """Call it as the model. A training-mode call on CUDA with grad enabled runs the graphs, captured at the first
    such call under the autocast then in force; any other call, or a batch of another shape, runs the model eagerly.
    The capture's warm-up steps draw from the CUDA RNG, which is put back afterwards: a resumed run then draws
    what a straight one does from the first step. `release()` gives the model its own forward back."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.eager = type(model).forward.__get__(model)  # make_graphed_callables replaces model.forward in place
        self.shape = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        graphed = images.is_cuda and self.model.training and torch.is_grad_enabled()
        if graphed and self.shape is None:
            self._capture(images)
        return self.model(images) if graphed and images.shape == self.shape else self.eager(images)

    def release(self):
        """The model's own forward again, and the graphs (and their memory) let go."""
        self.model.__dict__.pop("forward", None)
        self.shape = None

    def _capture(self, images):
        rng = torch.cuda.get_rng_state()
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)  # graphs need it off
        try:
            with autocast, thread_local_capture() as mode:
                torch.cuda.make_graphed_callables(self.model, (images.detach().clone(),), allow_unused_input=True,
                                                  **mode)
        except torch.OutOfMemoryError:
            raise VimexpError(f"out of GPU memory capturing the training step as a CUDA graph (batch "
                              f"{tuple(images.shape)}; the capture holds a step's activations beside its warm-up's): "
                              "set task.cuda_graph=false, or lower data.batch_size") from None
        except Exception as e:
            raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "run it eagerly with task.cuda_graph=false") from e
        torch.cuda.set_rng_state(rng)
        self.shape = images.shape
        rank_zero_info(f"training forward and backward captured as CUDA graphs (batch {tuple(images.shape)}); "
                       "task.cuda_graph=false runs them eagerly")


@contextmanager
def thread_local_capture():
    """make_graphed_callables' keyword arguments for a capture in which only this thread's CUDA calls count: in its
    default global mode, the loader's pin-memory thread allocating pinned memory meanwhile invalidates the capture
    (cudaErrorStreamCaptureInvalidated, now and then, docs/optimisation.md step 43). torch >= 2.12 takes the mode;
    before it, the torch.cuda.graph that make_graphed_callables opens is given it for the duration."""
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        yield {"capture_error_mode": "thread_local"}
        return
    graph = torch.cuda.graph
    torch.cuda.graph = lambda *args, **kwargs: graph(*args, **{**kwargs, "capture_error_mode": "thread_local"})
    try:
        yield {}
    finally:
        torch.cuda.graph = graph
