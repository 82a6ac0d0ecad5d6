"""Stage two: train a student on replayed views, with the teacher read from the cache or run live.

One loop serves three uses: distillation from a store (``CachedTeacher``),
distillation with the teacher run on the same replayed views
(``LiveTeacher``), and plain supervised training (no teacher, method ``ce``).
An epoch reads, for each block of samples, one whole stored unit of some view
(cycling through the views), shuffles rows within a window of blocks in
memory, and renders the batch's images in loader workers.

Under ``torch.distributed`` (DDP) each rank trains on its own share of every
epoch's units and metrics are reduced over ranks; ``EpochHooks`` save and
restore the whole training state once per epoch. With one process and no
hooks the loop is exactly the single-process one.

The package: ``loop`` (``train``, an epoch, validation), ``setup`` (a run built and checked once), ``optimisation``
(optimiser and schedule), ``ranks`` (DDP: batch sizes over workers, sums over ranks) and ``checkpoint`` (the state
--resume restores).
"""

from .checkpoint import EpochHooks
from .loop import TrainResult, evaluate, teacher_outputs, to_input, train, train_one_epoch, validate
from .optimisation import build_optimizer, lr_factor
from .ranks import check_batch, resolve_batch
from .setup import EMA_FOLDER, TEACHER, Setup, build_setup, check_input_size, check_repeats, check_teacher

__all__ = [
    "EMA_FOLDER",
    "TEACHER",
    "EpochHooks",
    "Setup",
    "TrainResult",
    "build_optimizer",
    "build_setup",
    "check_input_size",
    "check_repeats",
    "check_teacher",
    "evaluate",
    "lr_factor",
    "check_batch",
    "resolve_batch",
    "teacher_outputs",
    "to_input",
    "train",
    "train_one_epoch",
    "validate",
]
