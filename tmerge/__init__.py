"""tmerge: token merging for timm Vision Transformers, exported and profiled honestly."""

from . import _compat  # noqa: F401  (must precede any timm import)
from .config import MergeConfig
from .errors import TmergeError, VerificationError
from .models.merged import apply
from .models.spec import ModelSpec
from .patch import merge_info, tokens_per_layer
from .schedule import ScheduleSpec

__all__ = ["MergeConfig", "ModelSpec", "ScheduleSpec", "apply", "merge_info", "tokens_per_layer", "TmergeError",
           "VerificationError"]
__version__ = "0.1.0"
