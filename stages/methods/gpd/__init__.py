"""GPD (Guo et al., "Gap Preserving Distillation by Building Bidirectional Mappings with a Dynamic Teacher", ICLR 2025).

Beside the static teacher (its logits read from the cache) a dynamic teacher
trains from scratch with the student. It is the student widened r times by
inverse reparameterization, and the student lives inside it: one parameter
set, one optimiser.

* Widening. Every conv, linear and norm layer gets r times the channels,
  except the input of the first layer (RGB) and the output of the last (the
  classes). A weight W (out, in) becomes r output-dim copies of W / r plus
  N(0, 1e-6) noise, then r input-dim copies; norm parameters and running
  statistics are copied. The widened network then carries r copies of the
  student's activations divided by r, so each layer that is not positively
  homogeneous (BatchNorm, LayerNorm, GELU, the attention softmax) sees its
  input times r and hands its output back divided by r, as the official code
  does. At initialisation the widened network computes the student's function.
* The student is the top-left slice of every widened weight, times r (times
  1 for the classifier, whose output is not widened), with its own BatchNorm
  running statistics.
* One step: the dynamic teacher's loss L_D = CE + DKD(z_D, t) and the
  student's L_S = CE + DKD(z_S, t) + 3 SCE(z_S, softmax(z_D)) with z_D
  detached; both backward (one backward of the sum: the gradients add up the
  same), gradient clipping at 5 (``clip_grad`` in the recipe), one step.
  Without a teacher, CE + CE + 3 SCE: the paper's from-scratch mode.

* ``orepa``: the official ``--use_orepa``. Each 3x3 stride-1 conv of the
  dynamic teacher trains as an OREPA block (``orepa.py``: six linear
  branches merged into one kernel). The student's conv is converted first
  (``orepa_init``: ``official`` draws the other branches at random, as the
  official code does for a student trained from scratch; ``single`` keeps
  the student's kernel, as it does for a student that starts from trained
  weights), then every branch is widened so that the merged wide kernel is
  the student's merged kernel widened as above: the dynamic teacher still
  computes the student's function at initialisation. As officially
  (``DynamicOREPA.active_weight_gen``), the student merges the first copy
  of every branch tensor, each times the ratio its copies were divided by
  (the 1x1 of 1x1 -> kxk: its inner channels are inputs, r_in). That is
  the slice of the merged wide kernel at initialisation, not after: the
  wide 1x1 -> kxk branch sums over all r inner copies, the student's over
  the first, so the student's gradient G on that branch lands as r G on
  the first copy, as in the official code. Its export is the merged
  kernel: a plain timm model.

Supported students: timm ResNets (BasicBlock and Bottleneck, any depth and
width, plain convolutions) and plain timm ViTs (DeiT: class token, LayerNorm,
GELU MLP, timm's Attention without q/k norms); ``orepa`` needs a 3x3 stride-1
conv (a ResNet).

The package: ``wide_layers`` (each supported layer widened, and the student inside it), ``dynamic_teacher``
(the teacher built from a timm student) and ``method`` (``GPD``, registered as ``gpd``).
"""

from .dynamic_teacher import DynamicTeacher, check_supported
from .method import GPD
from .wide_layers import (
    SUPPORTED,
    WideAttention,
    WideBatchNorm2d,
    WideConv2d,
    WideGELU,
    WideLayerNorm,
    WideLayerScale,
    WideLinear,
    WideOREPAConv2d,
)

__all__ = [
    "GPD",
    "SUPPORTED",
    "DynamicTeacher",
    "WideAttention",
    "WideBatchNorm2d",
    "WideConv2d",
    "WideGELU",
    "WideLayerNorm",
    "WideLayerScale",
    "WideLinear",
    "WideOREPAConv2d",
    "check_supported",
]
