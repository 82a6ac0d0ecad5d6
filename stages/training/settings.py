"""A training run's settings, each declared once: its default, its check and its help.

The flags of ``pipeline train`` / ``distill`` (``--epochs``, ``--lr``, ...), the keys of a YAML recipe or sweep
file, their checks and their help all come from these fields (``stages.settings.setting``): a new setting is
one field here. ``size``, ``method`` and the timm names are resolved against the store and the registries by
the run's builder (``stages.training.job``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..methods.composite import Methods, MethodSpec, parse_method
from storage import UserError

from .run_metrics import LOGGERS
from ..settings import (
    MAX_BATCH,
    MAX_WORKERS,
    NON_NEGATIVE,
    POSITIVE,
    PROB,
    SEED,
    SIZE,
    WORKERS,
    Choice,
    Flag,
    Float,
    Int,
    ListOf,
    Mapping,
    ModelArgs,
    Optional,
    Text,
    setting,
)

BATCH = Int(1, MAX_BATCH)


class Logger(Choice):
    """A --log destination whose package is installed (each is an optional extra of the package)."""

    def check(self, value):
        value = super().check(value)
        if importlib.util.find_spec(value) is None:
            raise UserError(f"logging to {value} needs its package: pip install 'teacher-cache-pipeline[{value}]'")
        return value


VERIFY = ("all", "sample", "none")  # how many replayed views are fingerprinted (``stages.training.loader``)


@dataclass
class TrainSettings:
    student: str = setting("resnet18", Text(), "timm model name of the student")
    student_kwargs: dict = setting(
        None,
        ModelArgs(),
        "extra timm.create_model argument of the student, KEY=VALUE with a YAML value, e.g. channels=[8,16,32,64] (repeatable)",
        flag="--student-arg",
        factory=dict,
        show_default="none",
    )
    student_weights: str | None = setting(
        None,
        Optional(Text()),
        "start the student from weights: hub (timm's pretrained weights of --student), a safetensors or torch file "
        "(an earlier run's student.safetensors), or an earlier run's folder; a classifier for another class count starts afresh",
        show_default="random initialisation from --seed",
    )
    size: int | None = setting(
        None, Optional(SIZE), "input size of the student", show_default="the store's view size, else the model's own"
    )
    method: str = setting(
        "kd",
        MethodSpec(),
        "distillation method, or several as METHOD@TEACHER parts joined by +, each reading its own cached teacher "
        "(kd@beitv2_l+cospress@dinov2_s; a part's settings and weight go as --method-arg PART.KEY=VALUE)",
    )
    method_args: dict = setting(
        None,
        Mapping(),
        "method setting, KEY=VALUE, e.g. temperature=4 (repeatable)",
        flag="--method-arg",
        factory=dict,
        show_default="the method's own",
    )
    epochs: int = setting(10, Int(1, 100_000), "training epochs")
    batch_size: int = setting(
        64,
        BATCH,
        "samples per optimiser step per Ray Train worker, as timm's flag (with --ray-workers N the global batch is N times it); "
        "a last partial batch is dropped",
        show_default="a recipe's global_batch split over the workers, else 64",
    )
    global_batch: int | None = setting(
        None,
        Optional(Int(1, MAX_BATCH * MAX_WORKERS)),
        "samples per optimiser step over all Ray Train workers, as a paper states it; split over --ray-workers, "
        "which must divide it",
        show_default="--batch-size times the workers",
    )
    repeats: int = setting(
        1,
        Int(1, 1000),
        "repeated augmentation: each sample R times per epoch, with R different stored views (timm's --aug-repeats)",
    )
    optimizer: str = setting("adamw", Text(), "any timm optimizer: adamw, lamb, sgd (momentum; --nesterov), ...")
    momentum: float = setting(0.9, PROB, "momentum of sgd")
    nesterov: bool = setting(False, Flag(), "Nesterov momentum for sgd")
    lr: float = setting(
        1e-3,
        POSITIVE,
        "peak learning rate of --optimizer, reached after --warmup-epochs and then decayed by --schedule",
    )
    lr_base: float | None = setting(
        None,
        Optional(POSITIVE),
        "learning rate at a global batch of --lr-base-size: the run's rate follows its own global batch "
        "(timm's --lr-base rule); it wins over a recipe's lr, and --lr over it",
        show_default="off: --lr as given",
    )
    lr_base_size: int = setting(
        256, Int(1, MAX_BATCH * MAX_WORKERS), "the global batch at which --lr-base holds (timm's --lr-base-size)"
    )
    lr_base_scale: str | None = setting(
        None,
        Optional(Choice(("linear", "sqrt"))),
        "how --lr-base follows the global batch: linear, or sqrt",
        show_default="sqrt for adaptive optimizers (names with ada, and lamb), linear for the rest, as timm",
    )
    weight_decay: float = setting(
        0.05, NON_NEGATIVE, "weight decay of --optimizer, not applied to biases and norm layers (timm's filter)"
    )
    schedule: str = setting(
        "cosine",
        Choice(("cosine", "step")),
        "learning-rate decay: cosine (per step), or step (x --lr-gamma at each of --lr-milestones)",
    )
    lr_milestones: list = setting(
        None,
        ListOf(Int(0)),
        "epochs at which a step schedule multiplies the rate by --lr-gamma",
        factory=list,
        show_default="none",
    )
    lr_gamma: float = setting(0.1, POSITIVE, "factor of a step schedule at each milestone")
    warmup_epochs: float = setting(0.0, NON_NEGATIVE, "linear learning-rate warm-up, in epochs")
    label_smoothing: float = setting(0.0, Float(0.0, 1.0, hi_open=True), "label smoothing of the hard targets")
    drop_path: float | None = setting(
        None,
        Optional(Float(0.0, 1.0, hi_open=True)),
        "stochastic depth rate of the student",
        show_default="the model's own",
    )
    seed: int = setting(0, SEED, "seed of the student's initialisation and data order")
    label_fraction: float = setting(
        1.0,
        PROB,
        "share of training samples whose label the student may use, stratified per class; the others are supervised by the teacher "
        "alone, 0 trains from the cache only",
    )
    label_seed: int = setting(0, SEED, "seed of the stratified choice of --label-fraction")
    window_rows: int = setting(16384, Int(1), "rows shuffled together in memory (whole blocks of the store)")
    workers: int = setting(
        0, WORKERS, "loader processes rendering views, as timm's --workers; 0 renders in the training process"
    )
    verify: str = setting(
        "sample",
        Choice(VERIFY),
        "replayed views checked against the stored fingerprints: all, sample (about 1 in 100), none",
    )
    amp: str | None = setting(
        None,
        Optional(Choice(("bf16", "fp16"))),
        "autocast of each step: bf16, or fp16 with a gradient scaler (CUDA only)",
        show_default="off, float32",
    )
    channels_last: bool = setting(False, Flag(), "NHWC student and inputs, faster convolutions on GPUs")
    clip_grad: float | None = setting(
        None, Optional(POSITIVE), "clip the gradient norm to this value", show_default="no clipping"
    )
    model_ema: float | None = setting(
        None,
        Optional(Float(0.0, 1.0, lo_open=True, hi_open=True)),
        "also keep an EMA of the student with this decay (timm ModelEmaV3, e.g. 0.9998), "
        "evaluated each epoch and saved beside it",
        show_default="off",
    )
    compile: bool = setting(False, Flag(), "torch.compile the student")
    log: list = setting(
        None,
        ListOf(Logger(LOGGERS)),
        "also send each epoch's scalars and the run's settings to MLflow (MLFLOW_TRACKING_URI, else a file "
        "store mlruns/ beside the run folder) or Weights & Biases (offline into OUT/wandb unless logged in): mlflow, wandb",
        factory=list,
        show_default="TensorBoard and metrics.jsonl only",
    )

    @property
    def methods(self) -> Methods:
        """The ``method`` setting parsed: its parts and what they read (``parse_method`` parses each spec once)."""
        return parse_method(self.method)
