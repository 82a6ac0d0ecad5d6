"""The recipe (``ViewRecipe``: every view setting declared once) and the plan (``ViewPlan``: a recipe and a seed that
draw any view's parameters on demand)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields as dataclass_fields

import numpy as np
import torch

from storage import ArraySpec

from ...settings import NON_NEGATIVE, POSITIVE, PROB, Choice, Float, Int, Jitter, Optional, Seq, check_fields, setting

from .color import ColorJitter, normalise_jitter
from .draws import uniforms
from .erasing import RandomErasing
from .mixing import MixupCutmix
from .ops import INTERPOLATIONS, HorizontalFlip, RandomResizedCrop, ViewOp
from .randaugment import RandAugment, RandAugmentText

# Fields added after the first store format: left out of ``to_dict`` while every added
# augmentation is off, so stores made before them keep matching the default recipe.
_ADDED = (
    "randaugment",
    "ra_interpolation",
    "color_jitter",
    "erase_prob",
    "erase_area",
    "erase_aspect",
    "mixup_alpha",
    "cutmix_alpha",
    "mix_prob",
    "mix_switch_prob",
    "fill",
    "mix_pair_views",
)


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn, timm's training transforms as recorded ops. Saved in the store; two stores agree only
    if recipes and seeds do. Each field is declared once here: its check, its help (the flags and YAML keys of
    every command derive from it, ``stages.settings``)."""

    scale: tuple[float, float] = setting(
        (0.08, 1.0), Seq(Float(0.0, 1.0, lo_open=True)), "RandomResizedCrop area range"
    )
    ratio: tuple[float, float] = setting(
        (3 / 4, 4 / 3), Seq(POSITIVE), "RandomResizedCrop aspect range", show_default="0.75 1.333"
    )
    hflip: float = setting(0.5, PROB, "horizontal flip probability")
    eval_crop: float = setting(
        0.875, Float(0.0, 1.0, lo_open=True), "centre-crop fraction of evaluation views (timm's crop_pct)"
    )
    eval_interpolation: str = setting(
        "bilinear", Choice(INTERPOLATIONS), "how evaluation crops are resized (timm's RSB A1/A2 evaluate bicubic)"
    )
    randaugment: str | None = setting(
        None, Optional(RandAugmentText()), "timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1", show_default="off"
    )
    ra_interpolation: str = setting(
        "random",
        Choice(("random", *INTERPOLATIONS)),
        "resampling of RandAugment's geometric ops: random (timm's: one of the two per op, recorded), bilinear, bicubic",
    )
    color_jitter: float | tuple[float, ...] | None = setting(
        None,
        Optional(Jitter()),
        "colour jitter: one value, or B,C,S[,H] (brightness, contrast, saturation, hue); timm turns it off under RandAugment",
        show_default="off",
    )
    erase_prob: float = setting(0.0, PROB, "timm's RandomErasing probability (one box, constant fill)")
    erase_area: tuple[float, float] = setting(
        (0.02, 1 / 3),
        Seq(Float(0.0, 1.0, lo_open=True, hi_open=True)),
        "RandomErasing area range",
        show_default="0.02 0.333",
    )
    erase_aspect: tuple[float, float] = setting(
        (0.3, 1 / 0.3), Seq(POSITIVE), "RandomErasing aspect range", show_default="0.3 3.333"
    )
    mixup_alpha: float = setting(0.0, NON_NEGATIVE, "timm's Mixup alpha; 0 turns mixup off")
    cutmix_alpha: float = setting(0.0, NON_NEGATIVE, "timm's CutMix alpha; 0 turns cutmix off")
    mix_prob: float = setting(1.0, PROB, "share of views that mix, when mixup or cutmix is on")
    mix_switch_prob: float = setting(0.5, PROB, "share of mixing views that use cutmix when both are on")
    mix_pair_views: int = setting(
        1,
        Int(1, 1000),
        "views 0..K-1, K..2K-1, ... each mix a sample with one partner (its own lambda and box per view): with K = the "
        "repeats of training, a sample's repeated views and its partner's render from one decode each, as timm's RepeatAugSampler with "
        "batch mixing gives on one process; 1 draws a partner per view",
    )
    fill: tuple[int, int, int] = setting(
        (124, 116, 104),
        Seq(Int(0, 255), n=3, ordered=False),
        "uint8 colour of uncovered and erased pixels (the ImageNet mean)",
    )

    def __post_init__(self):
        # YAML and JSON give lists; the recipe holds tuples so that it stays hashable and comparable.
        for f in dataclass_fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        # Every field against its one declaration, however the recipe was made (YAML, flags, Python, a store):
        # a bad setting fails at set-up, not in a loader worker.
        check_fields(ViewRecipe, {f.name: getattr(self, f.name) for f in dataclass_fields(self)}, "the view recipe")
        self.ops()  # and what only an op can check: the RandAugment string

    def ops(self) -> list[ViewOp]:
        ops: list[ViewOp] = [RandomResizedCrop(self.scale, self.ratio), HorizontalFlip(self.hflip)]
        if self.randaugment:
            ops.append(RandAugment(self.randaugment, self.fill, self.ra_interpolation))
        if self.color_jitter is not None and any(normalise_jitter(self.color_jitter)):
            ops.append(ColorJitter(self.color_jitter))
        if self.erase_prob > 0:
            ops.append(RandomErasing(self.erase_prob, self.erase_area, self.erase_aspect, self.fill))
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0:
            ops.append(MixupCutmix(self.mixup_alpha, self.cutmix_alpha, self.mix_prob, self.mix_switch_prob))
        return ops

    def augments(self) -> bool:
        """Whether any augmentation beyond crop and flip is on."""
        return len(self.ops()) > 2

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.augments():
            d = {k: v for k, v in d.items() if k not in _ADDED}
        # the default, left out so that the default recipe's record stays as it was
        if self.eval_interpolation == "bilinear":
            del d["eval_interpolation"]
        if d.get("mix_pair_views") == 1:  # as for eval_interpolation: recipes recorded before the setting stay equal
            del d["mix_pair_views"]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "a view recipe") -> "ViewRecipe":
        """The recipe ``to_dict`` (or a store's record) describes, every value checked as a flag's would be."""
        return cls(**check_fields(cls, d, where))


@dataclass
class ViewPlan:
    """A recipe plus a seed: draws any view's parameters on demand."""

    recipe: ViewRecipe = field(default_factory=ViewRecipe)
    seed: int = 0

    def __post_init__(self):
        self.ops = self.recipe.ops()
        self.mixer = next((op for op in self.ops if op.mixes), None)

    @property
    def fields(self) -> dict[str, ArraySpec]:
        return {name: spec for op in self.ops for name, spec in op.fields.items()}

    def draw(self, view: int, ids: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters of ``view`` for samples ``ids`` (with image sizes (n, 2)).

        Every field but ``mix_partner`` depends on (seed, view, id) alone; the
        partner is drawn among ``ids`` (from the view's group of ``mix_pair_views``), so draw one whole block per call.
        """
        ids = np.asarray(ids)
        params = {}
        for op in self.ops:
            u = uniforms(self.seed, view, ids, op.stream, op.draws)
            if op.mixes and self.recipe.mix_pair_views > 1:
                # One matching for the view's group: every view of it pairs a sample with the same partner.
                group = view // self.recipe.mix_pair_views
                u[:, op.MATCH] = uniforms(self.seed, group, ids, op.GROUP_STREAM, 1)[:, 0]
            drawn = op.draw(u, sizes, ids)
            # Cast to the stored dtypes now: a drawn view renders exactly as its stored record.
            params.update({k: np.asarray(v, dtype=op.fields[k].dtype) for k, v in drawn.items()})
        return params

    def render_own(self, image: torch.Tensor, params: dict, size: int) -> torch.Tensor:
        """A view before mixing: every op but the mixing one."""
        for op in self.ops:
            if not op.mixes:
                image = op.apply(image, params, size)
        return image

    def render(self, image: torch.Tensor, params: dict, size: int, partner: tuple | None = None) -> torch.Tensor:
        """One view of a uint8 (3, H, W) image at ``size``: the same bytes on any machine.

        A view that mixes needs ``partner = (partner image, partner params)``:
        the partner's own view of the same view index, rendered here at ``size``.
        """
        view = self.render_own(image, params, size)
        if self.mixer is not None and int(params.get("mix_partner", -1)) >= 0:
            if partner is None:
                raise ValueError(
                    f"this view mixes with sample {int(params['mix_partner'])}: pass partner=(image, params)"
                )
            view = self.mixer.mix(view, self.render_own(partner[0], partner[1], size), params)
        return view

    def lam(self, params: dict, size: int) -> float:
        """The share of the sample's own image in its view at ``size`` (1.0 without mixing)."""
        return MixupCutmix.lam_at(params, size) if self.mixer is not None else 1.0

    def describe(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "seed": self.seed}
