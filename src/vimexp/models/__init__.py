"""Backbones by name: `create_model("vim_s", img_size=448)`, `create_model("vim_s", pretrained=True)` (the released
weights), `load_checkpoint(model, path)`; importing it registers the Vims with timm, pretrained_cfgs included."""
from vimexp.models import deit, hier_vim, vim_variants  # noqa: F401  (register the models)
from vimexp.models.checkpoint import load_checkpoint
from vimexp.models.registry import create_model, list_models, register_model
from vimexp.models.vim import VimMixer, VisionMamba

__all__ = ["create_model", "list_models", "register_model", "load_checkpoint", "VisionMamba", "VimMixer"]
