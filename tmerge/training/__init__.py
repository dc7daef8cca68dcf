"""Distillation training of learned merges (the DTEM embedding, the LTM mask): :func:`train_adapter`
(:mod:`.loop`, whose docstring describes the loss, the balanced r, annealing and resuming).

Modules: :mod:`.loop` the training loop; :mod:`.targets` the teacher's outputs, the distillation
loss and ToMe's reference loss per r; :mod:`.steps` what each step uses (data order, r, annealed
values, learning rate); :mod:`.checkpoint` the resumable checkpoint; :mod:`.options` the settings'
checks and parsers; :mod:`.distributed` torchrun's ranks; :mod:`.progress` the progress bar.
"""

from .checkpoint import checkpoint_path
from .distributed import Dist
from .loop import train_adapter
from .options import check_training_options, parse_anneal, parse_r_range, trainable_methods
from .steps import set_constant_r
from .targets import distill_loss, teacher_outputs, tome_reference_loss

__all__ = [
    "Dist", "check_training_options", "checkpoint_path", "distill_loss", "parse_anneal", "parse_r_range",
    "set_constant_r", "teacher_outputs", "tome_reference_loss", "train_adapter", "trainable_methods",
]
