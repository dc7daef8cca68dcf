"""tmerge: token merging for timm Vision Transformers, exported and profiled honestly."""

from . import _compat  # noqa: F401  (must precede any timm import)
from .errors import TmergeError, VerificationError
from .models.merged import apply
from .patch import merge_info, tokens_per_layer

__all__ = ["apply", "merge_info", "tokens_per_layer", "TmergeError", "VerificationError"]
__version__ = "0.1.0"
