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
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from storage import UserError

from .losses import dkd_loss, smoothed_soft_ce
from .orepa import EXPAND, VECTOR_INIT, OREPAConv2d, eligible
from .base import Method, MethodContext, hard_loss, loss_parts, register_method

SUPPORTED = "timm ResNets (resnet18, resnet34, resnet50, resnet10t ...: plain convolutions) and plain timm ViTs (deit_tiny_patch16_224, vit_tiny_patch16_224 ...)"


class _Mode:
    """Which network the widened layers compute: the dynamic teacher (wide) or the student inside it."""

    student = False


def _copies(x: torch.Tensor, r: int, dim: int, divide: bool, noise: float) -> torch.Tensor:
    """r copies of ``x`` along ``dim`` (each divided by r when ``divide``), each with its own N(0, noise) jitter."""
    if r == 1:
        return x
    part = x / r if divide else x
    return torch.cat([part + noise * torch.randn_like(part) for _ in range(r)], dim=dim)


class _Widened(nn.Module):
    """A widened layer: holds the dynamic teacher's parameters and computes either network."""

    def __init__(self, mode: _Mode, r: int):
        super().__init__()
        self._mode, self.r = mode, r

    @property
    def as_student(self) -> bool:
        return self._mode.student

    def student_state(self) -> dict[str, torch.Tensor]:
        """This layer's weights as the plain student layer's state_dict."""
        raise NotImplementedError


class WideConv2d(_Widened):
    """nn.Conv2d (groups 1) with r x the output channels (unless ``last``) and input channels (unless ``first``)."""

    def __init__(self, conv: nn.Conv2d, mode: _Mode, r: int, first: bool, last: bool, noise: float):
        super().__init__(mode, r)
        self.r_out, self.r_in = (1 if last else r), (1 if first else r)
        self.out_s, self.in_s = conv.out_channels, conv.in_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        w = _copies(conv.weight.detach(), self.r_out, 0, divide=True, noise=noise)
        self.weight = nn.Parameter(_copies(w, self.r_in, 1, divide=False, noise=noise))
        b = conv.bias
        self.bias = None if b is None else nn.Parameter(_copies(b.detach(), self.r_out, 0, divide=True, noise=noise))

    def _student(self):
        # The student is the top-left slice, times r: the r output copies each hold W / r.
        w = self.weight[: self.out_s, : self.in_s] * self.r_out
        b = None if self.bias is None else self.bias[: self.out_s] * self.r_out
        return w, b

    def forward(self, x):
        w, b = self._student() if self.as_student else (self.weight, self.bias)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)

    def student_state(self):
        w, b = self._student()
        return {"weight": w} if b is None else {"weight": w, "bias": b}


class WideOREPAConv2d(WideConv2d):
    """A widened 3x3 stride-1 conv trained as OREPA branches: ``weight`` is their merged wide kernel."""

    def __init__(self, conv: nn.Conv2d, mode: _Mode, r: int, first: bool, last: bool, noise: float, init: str):
        _Widened.__init__(self, mode, r)
        self.r_out, self.r_in = (1 if last else r), (1 if first else r)
        self.out_s, self.in_s = conv.out_channels, conv.in_channels
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.branches = _widen_orepa(OREPAConv2d.from_conv(conv, init), self.r_out, self.r_in, noise)

    @property
    def weight(self):
        return self.branches.weight

    def _student(self):
        # The official student: the block of the branches' first copies (the 1x1 -> kxk branch's 1x1 times r_in), merged,
        # times r_out. At initialisation the slice of the merged wide kernel; a quarter of the wide merge's cost at r = 2.
        w = self.branches.merged(self.out_s, self.in_s, inner_scale=self.r_in) * self.r_out
        b = None if self.bias is None else self.bias[: self.out_s] * self.r_out
        return w, b

    @property
    def bias(self):
        return self.branches.bias


def _widen_orepa(small: OREPAConv2d, r_out: int, r_in: int, noise: float) -> OREPAConv2d:
    """The dynamic teacher's OREPA block from the student's, as the official ``init_expand_orepa``: each branch
    widened so that the merged wide kernel is the student's merged kernel widened as ``WideConv2d`` widens one."""
    co, ci, k = small.out_channels, small.in_channels, small.kernel_size
    s = {n: t.detach() for n, t in small.state_dict().items()}

    def conv(w, r_rows=r_out):  # rows: r copies each divided by r; columns: r_in copies
        return _copies(_copies(w, r_rows, 0, divide=True, noise=noise), r_in, 1, divide=False, noise=noise)

    state = {n: conv(s[n]) for n in ("origin", "avg_conv", "prior_conv", "kxk", "pad_kernel")}
    # The 1x1 of 1x1 -> kxk maps the inputs to as many inner channels: its rows widen by r_in. The kxk then
    # sums r_in copies of (rows / r_in) x (its kernel / r_out): the student's product / r_out, as wanted. The
    # student takes the first inner copy alone, its 1x1 times r_in (``WideOREPAConv2d._student``), as officially.
    state.update(identity=conv(s["identity"], r_in), idconv=conv(s["idconv"], r_in))
    # Depthwise kernels belong to their input channel: copied, not divided; the 1x1 after them is a conv.
    state["dw"] = _copies(s["dw"].view(ci, EXPAND, k, k), r_in, 0, divide=False, noise=noise).reshape(r_in * ci * EXPAND, 1, k, k)
    state["pw"] = conv(s["pw"].view(co, ci, EXPAND)).reshape(r_out * co, r_in * ci * EXPAND)
    # Per-output-channel factors and filters are copied with their channel.
    state["vector"] = _copies(s["vector"], r_out, 1, divide=False, noise=noise)
    state["prior"] = _copies(s["prior"], r_out, 0, divide=False, noise=noise)
    if small.bias is not None:
        state["bias"] = _copies(s["bias"], r_out, 0, divide=True, noise=noise)
    wide = OREPAConv2d(r_in * ci, r_out * co, k, bias=small.bias is not None, init=small.init).to(small.origin)
    wide.load_state_dict(state)
    return wide


class WideLinear(WideConv2d):
    """nn.Linear widened like ``WideConv2d``."""

    def __init__(self, linear: nn.Linear, mode: _Mode, r: int, first: bool, last: bool, noise: float):
        _Widened.__init__(self, mode, r)
        self.r_out, self.r_in = (1 if last else r), (1 if first else r)
        self.out_s, self.in_s = linear.out_features, linear.in_features
        w = _copies(linear.weight.detach(), self.r_out, 0, divide=True, noise=noise)
        self.weight = nn.Parameter(_copies(w, self.r_in, 1, divide=False, noise=noise))
        b = linear.bias
        self.bias = None if b is None else nn.Parameter(_copies(b.detach(), self.r_out, 0, divide=True, noise=noise))

    def forward(self, x):
        w, b = self._student() if self.as_student else (self.weight, self.bias)
        return F.linear(x, w, b)


class WideBatchNorm2d(_Widened):
    """nn.BatchNorm2d over r x the channels, with the student's running statistics kept apart."""

    def __init__(self, bn: nn.BatchNorm2d, mode: _Mode, r: int, noise: float):
        super().__init__(mode, r)
        self.n, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.weight = nn.Parameter(_copies(bn.weight.detach(), r, 0, divide=False, noise=noise))
        self.bias = nn.Parameter(_copies(bn.bias.detach(), r, 0, divide=False, noise=noise))
        self.register_buffer("running_mean", bn.running_mean.repeat(r))
        self.register_buffer("running_var", bn.running_var.repeat(r))
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())
        self.register_buffer("student_mean", bn.running_mean.clone())
        self.register_buffer("student_var", bn.running_var.clone())
        self.register_buffer("student_batches_tracked", bn.num_batches_tracked.clone())

    def _factor(self, tracked: torch.Tensor) -> float:
        if not self.training:
            return 0.0
        tracked.add_(1)
        return 1.0 / float(tracked) if self.momentum is None else self.momentum  # momentum None: cumulative mean

    def forward(self, x):
        if self.as_student:
            factor = self._factor(self.student_batches_tracked)
            return F.batch_norm(
                x, self.student_mean, self.student_var, self.weight[: self.n], self.bias[: self.n], self.training, factor, self.eps
            )
        factor = self._factor(self.num_batches_tracked)
        y = F.batch_norm(x * self.r, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor, self.eps)
        return y / self.r

    def student_state(self):
        return {
            "weight": self.weight[: self.n],
            "bias": self.bias[: self.n],
            "running_mean": self.student_mean,
            "running_var": self.student_var,
            "num_batches_tracked": self.student_batches_tracked,
        }


class WideLayerNorm(_Widened):
    """nn.LayerNorm over r x the features (its input times r, its output divided by r)."""

    def __init__(self, ln: nn.LayerNorm, mode: _Mode, r: int, noise: float):
        super().__init__(mode, r)
        (self.n,) = ln.normalized_shape
        self.eps = ln.eps
        self.weight = nn.Parameter(_copies(ln.weight.detach(), r, 0, divide=False, noise=noise))
        self.bias = None if ln.bias is None else nn.Parameter(_copies(ln.bias.detach(), r, 0, divide=False, noise=noise))

    def forward(self, x):
        if self.as_student:
            b = None if self.bias is None else self.bias[: self.n]
            return F.layer_norm(x, (self.n,), self.weight[: self.n], b, self.eps)
        return F.layer_norm(x * self.r, (self.n * self.r,), self.weight, self.bias, self.eps) / self.r

    def student_state(self):
        out = {"weight": self.weight[: self.n]}
        if self.bias is not None:
            out["bias"] = self.bias[: self.n]
        return out


class WideGELU(_Widened):
    """GELU is not positively homogeneous: the wide network applies it at the student's scale."""

    def __init__(self, act: nn.GELU, mode: _Mode, r: int):
        super().__init__(mode, r)
        self.approximate = act.approximate

    def forward(self, x):
        if self.as_student:
            return F.gelu(x, approximate=self.approximate)
        return F.gelu(x * self.r, approximate=self.approximate) / self.r

    def student_state(self):
        return {}


class WideLayerScale(_Widened):
    """timm's LayerScale (x * gamma, positively homogeneous): gamma copied."""

    def __init__(self, ls, mode: _Mode, r: int, noise: float):
        super().__init__(mode, r)
        self.n, self.inplace = ls.gamma.shape[0], ls.inplace
        self.gamma = nn.Parameter(_copies(ls.gamma.detach(), r, 0, divide=False, noise=noise))

    def forward(self, x):
        gamma = self.gamma[: self.n] if self.as_student else self.gamma
        return x.mul_(gamma) if self.inplace else x * gamma

    def student_state(self):
        return {"gamma": self.gamma[: self.n]}


class WideAttention(_Widened):
    """timm's Attention with r x the heads: the qkv rows hold r copies of [q; k; v], each copy r heads' worth."""

    def __init__(self, attn, mode: _Mode, r: int, noise: float):
        super().__init__(mode, r)
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv = WideLinear(attn.qkv, mode, r, first=False, last=False, noise=noise)
        self.proj = WideLinear(attn.proj, mode, r, first=False, last=False, noise=noise)
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        H, hd = self.num_heads, self.head_dim
        if self.as_student:
            q, k, v = self.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
            heads = H
        else:
            # (B, N, r, 3, H, hd) -> 3 x (B, r H, N, hd): copy c's head h is head c H + h
            qkv = self.qkv(x).reshape(B, N, self.r, 3, H, hd).permute(3, 0, 2, 4, 1, 5).reshape(3, B, self.r * H, N, hd)
            q, k, v = qkv.unbind(0)
            q, k = q * self.r, k * self.r  # the softmax sees the student's scale; v stays divided by r
            heads = self.r * H
        dropout = self.attn_drop.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale)
        x = x.transpose(1, 2).reshape(B, N, heads * hd)
        return self.proj_drop(self.proj(x))

    def student_state(self):
        return {}  # its qkv and proj are widened layers of their own


# -- building the dynamic teacher from a timm student -------------------------------------------


def _layer_types():
    from timm.layers import Attention, DropPath, LayerScale, Mlp, PatchEmbed, SelectAdaptivePool2d
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    from timm.models.vision_transformer import Block, VisionTransformer

    containers = (ResNet, BasicBlock, Bottleneck, VisionTransformer, Block, Mlp, PatchEmbed, SelectAdaptivePool2d, nn.Sequential)
    # Layers that need nothing: parameter-free and positively homogeneous (f(x / r) = f(x) / r), or random.
    passthrough = (
        nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, DropPath,
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
    if type(model).__name__ == "VisionTransformer" and (getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg")):
        refuse(f"'{model.global_pool}' pooling (gpd widens token or avg pooling)")
    convertible = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GELU, attention, layer_scale)
    for path, m in model.named_modules():
        if isinstance(m, attention):
            if getattr(m, "gate", None) is not None or not all(isinstance(getattr(m, a, nn.Identity()), nn.Identity) for a in ("q_norm", "k_norm", "norm")):
                refuse(f"attention with q/k norms or gates ({path})")
        elif isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            refuse(f"grouped or depthwise convolutions ({path})")
        elif isinstance(m, nn.BatchNorm2d) and not (m.affine and m.track_running_stats):
            refuse(f"BatchNorm without affine parameters or running statistics ({path})")
        elif isinstance(m, nn.LayerNorm) and (len(m.normalized_shape) != 1 or m.weight is None):
            refuse(f"LayerNorm without affine parameters ({path})")
        elif not isinstance(m, convertible + containers + passthrough):
            refuse(f"{type(m).__name__} layers ({path})")


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
            raise UserError(f"method 'gpd' setting orepa=true re-parameterizes 3x3 stride-1 convolutions and student "
                            f"{name or type(student).__name__} has none: set orepa false (--method-arg orepa=false)")
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
                if isinstance(m, attention):
                    wide = WideAttention(m, self._mode, r, noise)
                elif isinstance(m, nn.Conv2d) and orepa is not None and eligible(m):
                    wide = WideOREPAConv2d(m, self._mode, r, first=path == first, last=path == last, noise=noise, init=orepa)
                elif isinstance(m, nn.Conv2d):
                    wide = WideConv2d(m, self._mode, r, first=path == first, last=path == last, noise=noise)
                elif isinstance(m, nn.Linear):
                    wide = WideLinear(m, self._mode, r, first=path == first, last=path == last, noise=noise)
                elif isinstance(m, nn.BatchNorm2d):
                    wide = WideBatchNorm2d(m, self._mode, r, noise)
                elif isinstance(m, nn.LayerNorm):
                    wide = WideLayerNorm(m, self._mode, r, noise)
                elif isinstance(m, nn.GELU):
                    wide = WideGELU(m, self._mode, r)
                elif isinstance(m, layer_scale):
                    wide = WideLayerScale(m, self._mode, r, noise)
                else:
                    continue
                _replace(net, path, wide)
            # ViT tokens are activations of the wide network: r copies, divided by r.
            self._tokens = {n: getattr(net, n).shape[-1] for n in _root_tokens(net)}
            for n in self._tokens:
                setattr(net, n, nn.Parameter(_copies(getattr(net, n).detach(), r, -1, divide=True, noise=noise)))
        self.net = net

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


@register_method("gpd")
class GPD(Method):
    """Gap Preserving Distillation: a dynamic teacher, the student widened ``ratio`` times, trains beside the
    student it contains; the static teacher's logits come from the cache (or there is none: from scratch).

    L_D = ce_weight CE(z_D) + DKD(z_D, t), L_S = ce_weight CE(z_S) + DKD(z_S, t) + kd_weight SCE(z_S, softmax(z_D))
    with DKD at (alpha, beta, temperature) and SCE smoothed by ``smoothing``; the total is L_D + L_S.
    ``orepa``: the dynamic teacher's 3x3 stride-1 convs train as OREPA blocks, initialised ``orepa_init``
    (by default ``official`` for a student trained from scratch, ``single`` for one that starts from trained weights).
    """

    needs = ("logits",)
    requires_teacher = False
    student_needs = ("logits",)

    def __init__(
        self, context: MethodContext, ratio=2, kd_weight=3.0, smoothing=0.1, alpha=1.0, beta=0.5, temperature=1.0,
        ce_weight=1.0, noise=1e-6, hard_loss="ce", orepa=False, orepa_init=None,
    ):
        super().__init__()
        # As the official train_dkd.py: a student loaded from trained weights keeps its function (single), one from scratch does not.
        orepa_init = orepa_init or ("single" if context.student_trained else "official")
        if orepa_init not in VECTOR_INIT:
            raise UserError(f"method 'gpd' setting orepa_init must be one of {', '.join(VECTOR_INIT)}, not {orepa_init!r}")
        self.ratio, self.kd_weight, self.smoothing = ratio, kd_weight, smoothing
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.noise, self.hard_loss = ce_weight, noise, hard_loss
        self.orepa = orepa_init if orepa else None

    def wrap_student(self, model):
        name = (model.pretrained_cfg or {}).get("architecture", "")
        return DynamicTeacher(model, self.ratio, self.noise, name=name, orepa=self.orepa)

    def student_outputs(self, model: DynamicTeacher, x):
        wide = model.wide(x)  # (B, C): the dynamic teacher, computed first as in the official step
        return {"logits": model(x), "wide_logits": wide}

    def export_student(self, model: DynamicTeacher):
        return model.export()

    def forward(self, student, teacher, targets):
        z_s, z_d = student["logits"], student["wide_logits"]
        ce_s, ce_d = hard_loss(self.hard_loss, z_s, targets), hard_loss(self.hard_loss, z_d, targets)
        loss_d, loss_s = self.ce_weight * ce_d, self.ce_weight * ce_s
        parts = {}
        if "logits" in teacher:  # the static teacher, cached
            t = teacher["logits"]
            target = targets.classes(t)
            dkd_d = dkd_loss(z_d, t, target, self.alpha, self.beta, self.temperature)
            dkd_s = dkd_loss(z_s, t, target, self.alpha, self.beta, self.temperature)
            loss_d, loss_s = loss_d + dkd_d, loss_s + dkd_s
            parts.update(dkd=dkd_s, wide_dkd=dkd_d)
        sce = smoothed_soft_ce(z_s, torch.softmax(z_d.detach(), dim=1), self.smoothing)
        loss_s = loss_s + self.kd_weight * sce
        # One backward of the sum gives each parameter the gradients of L_D's and L_S's backward passes added.
        hard = self.hard_loss  # the label terms named as computed: ce or bce
        return loss_d + loss_s, loss_parts(**{hard: ce_s, f"wide_{hard}": ce_d}, sce=sce, **parts)
