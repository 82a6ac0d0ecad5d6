"""The student's layers widened r times (convolutions, OREPA blocks, linears, norms, GELU, LayerScale, attention):
each holds the wide parameters and computes either the wide layer or the student inside it (``_Mode``)."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


from ..orepa import EXPAND, OREPAConv2d

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
    state["dw"] = _copies(s["dw"].view(ci, EXPAND, k, k), r_in, 0, divide=False, noise=noise).reshape(
        r_in * ci * EXPAND, 1, k, k
    )
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
                x,
                self.student_mean,
                self.student_var,
                self.weight[: self.n],
                self.bias[: self.n],
                self.training,
                factor,
                self.eps,
            )
        factor = self._factor(self.num_batches_tracked)
        y = F.batch_norm(
            x * self.r, self.running_mean, self.running_var, self.weight, self.bias, self.training, factor, self.eps
        )
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
        self.bias = (
            None if ln.bias is None else nn.Parameter(_copies(ln.bias.detach(), r, 0, divide=False, noise=noise))
        )

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
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, scale=self.scale
        )
        x = x.transpose(1, 2).reshape(B, N, heads * hd)
        return self.proj_drop(self.proj(x))

    def student_state(self):
        return {}  # its qkv and proj are widened layers of their own
