"""The dynamic teacher built from a timm student: its supported layers replaced by their widened versions, the
student's forward run through the same parameters (``DynamicTeacher``)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from storage import UserError

from ..orepa import eligible
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
    _copies,
    _Mode,
    _Widened,
)

# -- building the dynamic teacher from a timm student -------------------------------------------


def _layer_types():
    from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchEmbed, SelectAdaptivePool2d
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    from timm.models.vision_transformer import Block, VisionTransformer

    containers = (
        ResNet,
        BasicBlock,
        Bottleneck,
        VisionTransformer,
        Block,
        Mlp,
        PatchEmbed,
        SelectAdaptivePool2d,
        nn.Sequential,
    )
    # Layers that need nothing: parameter-free and positively homogeneous (f(x / r) = f(x) / r), or random.
    passthrough = (
        nn.ReLU,
        nn.Identity,
        nn.Dropout,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Flatten,
        DropPath,
    )
    return containers, passthrough, Attention, LayerScale


def check_supported(model: nn.Module, name: str = "") -> None:
    """Refuse, in one line, a student the widening does not cover."""
    containers, passthrough, attention, layer_scale = _layer_types()
    what = name or type(model).__name__

    def refuse(has: str):
        raise UserError(f"method 'gpd' cannot widen student {what}: it has {has}; gpd supports {SUPPORTED}")

    if type(model).__name__ not in ("ResNet", "VisionTransformer"):
        refuse(f"the architecture {type(model).__name__}")
    if not isinstance(model.get_classifier(), nn.Linear):
        refuse(f"no linear classifier ({type(model.get_classifier()).__name__})")
    if type(model).__name__ == "VisionTransformer" and (
        getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg")
    ):
        refuse(f"'{model.global_pool}' pooling (gpd widens token or avg pooling)")
    convertible = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GELU, attention, layer_scale)
    for path, m in model.named_modules():
        problem = _layer_problem(m, attention, convertible + containers + passthrough)
        if problem:
            refuse(f"{problem} ({path})")


def _layer_problem(m: nn.Module, attention, known: tuple) -> str | None:
    """What in layer ``m`` the widening does not cover, or None."""
    if isinstance(m, attention):
        plain = getattr(m, "gate", None) is None and all(
            isinstance(getattr(m, a, nn.Identity()), nn.Identity) for a in ("q_norm", "k_norm", "norm")
        )
        return None if plain else "attention with q/k norms or gates"
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
        return "grouped or depthwise convolutions"
    if isinstance(m, nn.BatchNorm2d) and not (m.affine and m.track_running_stats):
        return "BatchNorm without affine parameters or running statistics"
    if isinstance(m, nn.LayerNorm) and (len(m.normalized_shape) != 1 or m.weight is None):
        return "LayerNorm without affine parameters"
    if not isinstance(m, known):
        return f"{type(m).__name__} layers"
    return None


def _inside(model: nn.Module, path: str, kind) -> bool:
    """Whether ``path`` lies inside a module of type ``kind`` (an Attention's own qkv, proj, dropouts)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), kind):
            return True
    return False


def _root_tokens(model: nn.Module) -> list[str]:
    """A ViT's own token parameters (class token, registers, position embedding): last dim = embed_dim."""
    return [n for n in ("cls_token", "reg_token", "pos_embed") if isinstance(getattr(model, n, None), nn.Parameter)]


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class DynamicTeacher(nn.Module):
    """The dynamic teacher: the student widened r times, holding the student inside it.

    ``wide(x)`` gives the dynamic teacher's logits, ``forward(x)`` (and so
    evaluation) the student's, ``export()`` the student as a plain timm model.
    """

    def __init__(self, student: nn.Module, r: int = 2, noise: float = 1e-6, name: str = "", orepa: str | None = None):
        """``orepa``: None, or the OREPA initialisation (``official``, ``single``) of the 3x3 stride-1 convs."""
        super().__init__()
        if int(r) != r or r < 2:
            raise UserError(f"gpd's ratio must be a whole number of at least 2, not {r}")
        r = int(r)
        check_supported(student, name)
        if orepa is not None and not any(eligible(m) for m in student.modules()):
            raise UserError(
                f"method 'gpd' setting orepa=true re-parameterizes 3x3 stride-1 convolutions and student "
                f"{name or type(student).__name__} has none: set orepa false (--method-arg orepa=false)"
            )
        _, _, attention, layer_scale = _layer_types()
        self.r, self._mode = r, _Mode()
        self._template = [copy.deepcopy(student)]  # a list: the plain student is no submodule (nor trained, nor in DDP)
        net = copy.deepcopy(student)
        first = next(p for p, m in net.named_modules() if isinstance(m, nn.Conv2d))  # the RGB input
        classifier = net.get_classifier()
        last = next(p for p, m in net.named_modules() if m is classifier)
        with torch.no_grad():
            for path, m in list(net.named_modules()):
                if not path or _inside(net, path, WideAttention):
                    continue
                ends = {"first": path == first, "last": path == last}
                wide = self._widened(m, ends, noise, orepa, attention, layer_scale)
                if wide is not None:
                    _replace(net, path, wide)
            # ViT tokens are activations of the wide network: r copies, divided by r.
            self._tokens = {n: getattr(net, n).shape[-1] for n in _root_tokens(net)}
            for n in self._tokens:
                setattr(net, n, nn.Parameter(_copies(getattr(net, n).detach(), r, -1, divide=True, noise=noise)))
        self.net = net

    def _widened(self, m: nn.Module, ends: dict, noise: float, orepa: str | None, attention, layer_scale):
        """Layer ``m`` as its wide counterpart (``ends``: whether it is the input conv or the classifier), or None for
        a layer with nothing to widen (a container, an activation that works on any width)."""
        r, mode = self.r, self._mode
        if isinstance(m, attention):
            return WideAttention(m, mode, r, noise)
        if isinstance(m, nn.Conv2d) and orepa is not None and eligible(m):
            return WideOREPAConv2d(m, mode, r, **ends, noise=noise, init=orepa)
        if isinstance(m, nn.Conv2d):
            return WideConv2d(m, mode, r, **ends, noise=noise)
        if isinstance(m, nn.Linear):
            return WideLinear(m, mode, r, **ends, noise=noise)
        if isinstance(m, nn.BatchNorm2d):
            return WideBatchNorm2d(m, mode, r, noise)
        if isinstance(m, nn.LayerNorm):
            return WideLayerNorm(m, mode, r, noise)
        if isinstance(m, nn.GELU):
            return WideGELU(m, mode, r)
        if isinstance(m, layer_scale):
            return WideLayerScale(m, mode, r, noise)
        return None

    @contextmanager
    def _as(self, student: bool):
        before, self._mode.student = self._mode.student, student
        try:
            yield
        finally:
            self._mode.student = before

    def _student_tokens(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self.net, n)[..., :d] * self.r for n, d in self._tokens.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The student's logits."""
        with self._as(student=True):
            if not self._tokens:
                return self.net(x)
            # The student's token parameters are slices of the wide ones, put in place for this call only.
            return torch.func.functional_call(self.net, self._student_tokens(), (x,), strict=False)

    def wide(self, x: torch.Tensor) -> torch.Tensor:
        """The dynamic teacher's logits."""
        with self._as(student=False):
            return self.net(x)

    @torch.no_grad()
    def export(self) -> nn.Module:
        """The student as the plain timm model it was built as, holding its current weights and statistics."""
        student = copy.deepcopy(self._template[0])
        for path, m in self.net.named_modules():
            if isinstance(m, _Widened):
                state = m.student_state()
                if state:
                    student.get_submodule(path).load_state_dict(state, strict=False)
        for n, t in self._student_tokens().items():
            getattr(student, n).copy_(t)
        student.train(self.training)
        return student
