"""OREPA: a k x k stride-1 convolution trained as six linear branches and run as one convolution.

Hu et al., "Online Convolutional Re-parameterization" (CVPR 2022), in the variant GPD's official code trains
its dynamic teacher with (guoyongcs/GPD, ``CNN/orepa_ft.py``, class ``OREPA``; ``--use_orepa`` in every
command of its README). Each branch is scaled per output channel by a row of the learned ``vector`` (6, O):

  0 origin    the converted conv's own k x k kernel
  1 avg       a 1x1 conv, then k x k average pooling (zero padding counted)
  2 prior     a 1x1 conv, then a fixed per-channel frequency filter (cosines along h for the first half of
              the output channels, along w for the second)
  3 1x1_kxk   a 1x1 conv (in -> in: identity plus a learned residual, zero at first), then a k x k conv
  4 1x1       a zero-padded kernel; the official code gives this "1x1" branch a full k x k shape (its
              ``weight_orepa_1x1`` is (O, I, 3, 3)): we follow the code that ran
  5 dw_pw     a k x k depthwise conv expanding each input channel 8 times, then a 1x1 conv
Every branch is linear in the input, so their sum is one k x k kernel, ``weight``: forward is one plain conv
with it, and the branches cost kernel arithmetic only, never a pass over the activations.

Initialisation, as ``OREPA.__init__`` does:
  ``official``  (a student trained from scratch) vector rows 0.25, 0.25, 0, 0.5, 0.05, 0.5; the origin holds
                the converted kernel, the other branches are Kaiming-uniform draws. The merged kernel is then
                NOT the converted conv's: the network's function changes (the student is random anyway).
  ``single``    (``single_init``, a student that starts from trained weights) vector rows 1, 0, 0, 0, 0, 0:
                the merged kernel is the converted conv's, so the network keeps its function.
One difference from the official block: a bias only where the converted conv has one (the official block adds
a zero-initialised bias to every conv), so merging gives back the same architecture, a plain timm model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BRANCHES = ("origin", "avg", "prior", "1x1_kxk", "1x1", "dw_pw")
VECTOR_INIT = {"official": (0.25, 0.25, 0.0, 0.5, 0.05, 0.5), "single": (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)}
EXPAND = 8  # depthwise channels per input channel in the dw_pw branch


def eligible(m: nn.Module) -> bool:
    """A conv OREPA re-parameterizes: 3x3, stride 1, padding 1, no dilation, no groups, zero padding."""
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.padding == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def frequency_prior(out_channels: int, k: int) -> torch.Tensor:
    """(O, k, k) fixed filters: channel i < O/2 is cos(pi (h + 1/2)(i + 1) / k) along h, the rest the same along w."""
    i = torch.arange(out_channels, dtype=torch.float64)[:, None]  # (O, 1)
    pos = torch.arange(k, dtype=torch.float64)[None, :] + 0.5  # (1, k)
    half = out_channels / 2  # a float, as the official code: an odd O shifts the second half's frequencies by 1/2
    along_h = torch.cos(math.pi * pos * (i + 1) / k)[:, :, None].expand(-1, k, k)  # varies with h
    along_w = torch.cos(math.pi * pos * (i + 1 - half) / k)[:, None, :].expand(-1, k, k)  # varies with w
    return torch.where((i < half)[:, :, None], along_h, along_w).float()


def _kaiming(*shape: int) -> torch.Tensor:
    w = torch.empty(shape)
    nn.init.kaiming_uniform_(w, a=0.0)  # the official init of every learned branch kernel
    return w


class OREPAConv2d(nn.Module):
    """A k x k, stride-1, "same"-padded convolution held as six branches; ``weight`` is their merged kernel."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = False, init: str = "official"
    ):
        super().__init__()
        if init not in VECTOR_INIT:
            raise ValueError(f"OREPA init must be one of {', '.join(VECTOR_INIT)}, not {init!r}")
        co, ci, k = out_channels, in_channels, kernel_size
        self.in_channels, self.out_channels, self.kernel_size, self.init = ci, co, k, init
        self.origin = nn.Parameter(_kaiming(co, ci, k, k))
        self.avg_conv = nn.Parameter(_kaiming(co, ci))  # 1x1 kernels are held as (O, I): the same fan-in
        self.prior_conv = nn.Parameter(_kaiming(co, ci))
        self.idconv = nn.Parameter(torch.zeros(ci, ci))  # the 1x1 of 1x1 -> kxk is identity + this
        self.kxk = nn.Parameter(_kaiming(co, ci, k, k))
        self.pad_kernel = nn.Parameter(_kaiming(co, ci, k, k))  # the official "1x1" branch, k x k in its code
        self.dw = nn.Parameter(_kaiming(ci * EXPAND, 1, k, k))
        self.pw = nn.Parameter(_kaiming(co, ci * EXPAND))
        self.vector = nn.Parameter(torch.tensor(VECTOR_INIT[init])[:, None].repeat(1, co))  # (6, O)
        self.register_parameter("bias", nn.Parameter(torch.zeros(co)) if bias else None)
        # Buffers, saved: GPD widens them with the rest (copies of I / r are no identity).
        self.register_buffer("identity", torch.eye(ci))
        self.register_buffer("prior", frequency_prior(co, k))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, init: str = "official") -> "OREPAConv2d":
        """The block for ``conv`` (an ``eligible`` one), its origin branch holding ``conv``'s kernel and bias."""
        if not eligible(conv):
            raise ValueError(f"OREPA converts 3x3 stride-1 padding-1 ungrouped convolutions, not {conv}")
        block = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], bias=conv.bias is not None, init=init)
        block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            block.origin.copy_(conv.weight)
            if conv.bias is not None:
                block.bias.copy_(conv.bias)
        return block

    def branch_kernels(
        self, rows: int | None = None, cols: int | None = None, inner_scale: float = 1.0
    ) -> list[torch.Tensor]:
        """Each branch's kernel before its per-channel scale, in ``BRANCHES`` order: (O, I, k, k); given ``rows`` and
        ``cols``, those of the smaller block made of the top-left slices of this block's tensors (GPD's student inside
        a widened block, as the official ``DynamicOREPA.active_weight_gen``). Every branch's is then the corner of its
        full kernel but the 1x1 -> kxk branch's, whose inner channels are sliced as its inputs are and whose 1x1
        (identity + residual) is multiplied by ``inner_scale``."""
        co, ci, k = self.out_channels, self.in_channels, self.kernel_size
        o, i = slice(rows), slice(cols)
        avg = self.avg_conv[o, i, None, None].expand(-1, -1, k, k) / (k * k)
        prior = self.prior_conv[o, i, None, None] * self.prior[o, None]  # (O, I, 1, 1) x (O, 1, k, k)
        conv1 = (self.identity[i, i] + self.idconv[i, i]) * inner_scale  # (T, I): T, its outputs, are the inputs again
        kxk = torch.einsum("ti,othw->oihw", conv1, self.kxk[o, i])
        dw_pw = torch.einsum("iehw,oie->oihw", self.dw.view(ci, EXPAND, k, k)[i], self.pw.view(co, ci, EXPAND)[o, i])
        return [self.origin[o, i], avg, prior, kxk, self.pad_kernel[o, i], dw_pw]

    def merged(self, rows: int | None = None, cols: int | None = None, inner_scale: float = 1.0) -> torch.Tensor:
        """The merged kernel, or that of the block of top-left slices (``branch_kernels``): the branch kernels, each
        scaled per output channel, summed."""
        out = 0
        branches = self.branch_kernels(rows, cols, inner_scale)
        for v, kernel in zip(self.vector[:, slice(rows)], branches):  # a running sum: no stack
            out = out + v[:, None, None, None] * kernel
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The merged (O, I, k, k) kernel."""
        return self.merged()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, 1, self.kernel_size // 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, init={self.init}, bias={self.bias is not None}"


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def convert_to_orepa(model: nn.Module, init: str = "official") -> list[str]:
    """Replace every ``eligible`` conv of ``model`` (in place) by its OREPA block; the paths replaced."""
    paths = [path for path, m in model.named_modules() if path and eligible(m)]
    for path in paths:
        _replace(model, path, OREPAConv2d.from_conv(model.get_submodule(path), init))
    return paths


@torch.no_grad()
def merge_orepa(model: nn.Module) -> nn.Module:
    """Replace every OREPA block of ``model`` (in place) by a plain nn.Conv2d holding its merged kernel."""
    for path, m in list(model.named_modules()):
        if path and isinstance(m, OREPAConv2d):
            conv = nn.Conv2d(
                m.in_channels, m.out_channels, m.kernel_size, padding=m.kernel_size // 2, bias=m.bias is not None
            )
            conv = conv.to(device=m.origin.device, dtype=m.origin.dtype)
            conv.weight.copy_(m.weight)
            if m.bias is not None:
                conv.bias.copy_(m.bias)
            conv.train(m.training)
            _replace(model, path, conv)
    return model
