"""A model's training forward and backward replayed as CUDA graphs (torch.cuda.make_graphed_callables): one launch
each instead of hundreds of kernels, so the host's Python no longer bounds a step. A fused Vim-S step at batch 128
enqueues for 71 ms against 109 ms on the H200, and the CLI's loop, EMA, callbacks and loader thread come on top
(docs/optimisation.md, step 27). The optimizer, EMA and everything else stay eager."""
import torch
from lightning.pytorch.utilities import rank_zero_info


def graph_blocker(model: torch.nn.Module, trainer) -> str | None:
    """Why the training step can't be graphed in this run (a sentence), or None."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return "the model is compiled (compile=true)"
    if trainer.world_size > 1:
        return "DDP (its gradient hooks would all fire at the graph's end, with no overlap of communication)"
    if trainer.accumulate_grad_batches > 1:
        return "trainer.accumulate_grad_batches > 1 (graph-owned gradients can't be accumulated into)"
    return None


class GraphedTraining:
    """Call it as the model. A training-mode call on CUDA with grad enabled runs the graphs, captured at the first
    such call under the autocast then in force; a batch of another shape, or an eval call, runs the model eagerly.
    The capture's warm-up steps draw from the CUDA RNG, which is put back afterwards: a resumed run then draws
    what a straight one does from the first step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.eager = model.forward  # make_graphed_callables replaces the module's forward in place
        self.shape = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not (images.is_cuda and self.model.training and torch.is_grad_enabled()):
            return self.model(images)
        if self.shape is None:
            self._capture(images)
        return self.model(images) if images.shape == self.shape else self.eager(images)

    def _capture(self, images):
        rng = torch.cuda.get_rng_state()
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)  # graphs need it off
        try:
            with autocast:
                torch.cuda.make_graphed_callables(self.model, (images.detach().clone(),), allow_unused_input=True)
        except Exception as e:
            raise RuntimeError(f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {e}); "
                               "run it eagerly with task.cuda_graph=false") from e
        torch.cuda.set_rng_state(rng)
        self.shape = images.shape
        rank_zero_info(f"training forward and backward captured as CUDA graphs (batch {tuple(images.shape)}); "
                       "task.cuda_graph=false runs them eagerly")
