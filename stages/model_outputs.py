"""A timm model's outputs as a dict keyed like a teacher's (``logits``, ``features``, ``tokens``), for students and teachers alike."""

from __future__ import annotations

import torch
from torch import nn


def student_forward(model: nn.Module, x: torch.Tensor, needs) -> dict[str, torch.Tensor]:
    """The student's outputs from one ``forward_features`` pass, keyed like a teacher's.

    Always ``logits`` (B, C); ``features`` (B, D), the pooled pre-logits feature, and ``tokens``
    (B, T, D) after the final norm when ``needs`` names them (see ``tokens_of``).
    """
    f = model.forward_features(x)
    features = model.forward_head(f, pre_logits=True)
    out = {"logits": model.get_classifier()(features)}
    if "features" in needs:
        out["features"] = features
    if "tokens" in needs:
        out["tokens"] = tokens_of(model, f)
    return out


def tokens_of(model: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """(B, T, D) tokens from ``forward_features`` output, laid out as a teacher's cached tokens are.

    ViTs: the CLS token then the patch tokens, after the final norm (register tokens dropped: they
    carry no image position). CNNs: the last feature map's H*W positions, row-major.
    """
    if f.ndim == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC":  # (B, H, W, C)
            return f.flatten(1, 2)
        return f.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    prefix = getattr(model, "num_prefix_tokens", 0)
    if prefix and getattr(model, "cls_token", None) is not None:
        return torch.cat([f[:, :1], f[:, prefix:]], dim=1)
    return f[:, prefix:]


def token_prefix(model: nn.Module) -> int:
    """Leading non-patch tokens ``tokens_of`` keeps: 1 (the CLS token) for ViTs with a class token, else 0."""
    return int(bool(getattr(model, "num_prefix_tokens", 0)) and getattr(model, "cls_token", None) is not None)


@torch.no_grad()
def token_shape(model: nn.Module, size: int) -> tuple[int, int]:
    """(T, D) of the student's ``tokens`` at ``size`` px, from one forward of a zero image in eval mode."""
    was_training = model.training
    p = next(model.parameters())
    model.eval()
    try:
        f = model.forward_features(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    return tuple(tokens_of(model, f).shape[1:])
