"""Recorded augmented views: parameters drawn once, stored, and replayed exactly.

A view's parameters are a pure function of (plan seed, view index, sample id)
(a mixing partner also of the block the sample is drawn with), drawn from a
counter-based hash rather than a stateful generator, so any subset of views
can be drawn in any order by any worker. Each augmentation is
a ``ViewOp``: it names the fields it records, draws them for a batch of
samples (vectorised), and applies one sample's fields to a uint8 image. The
store records whatever fields the ops declare.

The ops, in the order they touch the image (timm's training order):

==================  =========  ======================================================
op                  stream     recorded fields
==================  =========  ======================================================
RandomResizedCrop   0          crop (4,) float32
HorizontalFlip      1          flip uint8
RandAugment         2          ra_op (n,) int8, ra_apply (n,) uint8, ra_mag (n,) float32
                               (sign folded in), ra_interp (n,) uint8 if random
ColorJitter         3          cj_factors (4,) float32, cj_order (4,) uint8
RandomErasing       4          erase_box (4,) float32
MixupCutmix         5          mix_partner int64, mix_lam float64, mix_box (4,) float32
                    6          (the matching of a group of views, ``mix_pair_views`` > 1)
==================  =========  ======================================================

Streams are fixed per op, so turning one augmentation on never changes what
another draws, and the default recipe (crop + flip) draws what it always did.
Every model renders the same view at its own size: the crop is resized to
that size first and everything after it works at that size (erasing and
cutmix boxes are normalised). A mixing view mixes its own render (every op
but the mixing) with its partner's own render; partners are mates in a random
perfect matching of the block, so a loader that keeps mates together renders
each image once for both mixes (``stages.data.replay``).

The package, one module per concern as ``timm/data/`` keeps its transforms: ``draws`` (the counter-based
uniforms), ``ops`` (the op interface, crop and flip, image conversions, ``normalize``), ``randaugment``,
``color``, ``erasing``, ``mixing`` (mixup, cutmix, mixed targets), ``recipe`` (``ViewRecipe``, ``ViewPlan``)
and ``evaluation`` (evaluation views, a sample's row, a view's fingerprint).
"""

from .color import ColorJitter, normalise_jitter
from .draws import uniforms
from .erasing import RandomErasing
from .evaluation import EVAL_FIELDS, eval_params, fingerprint, row
from .mixing import MixupCutmix, beta_quantile, mixed_targets, pair_partners
from .ops import (
    INTERPOLATIONS,
    HorizontalFlip,
    RandomResizedCrop,
    ViewOp,
    crop_resize,
    from_pil,
    normalize,
    pixel_box,
    to_pil,
)
from .randaugment import NEGATED_OPS, RandAugment, RandAugmentText, parse_randaugment
from .recipe import ViewPlan, ViewRecipe

__all__ = [
    "EVAL_FIELDS",
    "INTERPOLATIONS",
    "NEGATED_OPS",
    "ColorJitter",
    "HorizontalFlip",
    "MixupCutmix",
    "RandAugment",
    "RandAugmentText",
    "RandomErasing",
    "RandomResizedCrop",
    "ViewOp",
    "ViewPlan",
    "ViewRecipe",
    "beta_quantile",
    "crop_resize",
    "eval_params",
    "fingerprint",
    "from_pil",
    "mixed_targets",
    "normalise_jitter",
    "normalize",
    "pair_partners",
    "parse_randaugment",
    "pixel_box",
    "row",
    "to_pil",
    "uniforms",
]
