"""CosPress (Mannix & Bui, "Preserving Angles Improves Feature Distillation of Foundation Models"), from cached DINOv2 tokens.

The official code (emannix/cospress-cosine-similarity-preserving-compression,
where the method first appears as "TinTeM") compresses the teacher's token
space instead of inflating the student's:

* A mapping head on the teacher side, LayerNorm(D_t) -> Linear(D_t -> D_s), one
  module for every token and the CLS token, trained from random
  initialisation only by the two similarity-preserving losses.
* Local loss: per image, the cosine-similarity structure of the teacher's
  tokens and of the mapped tokens, as symmetric t-SNE-style joint
  distributions (self-pairs excluded), compared by KL at ten temperatures
  0.01 ... 0.10 (``similarity_kl``). Global loss: the same over the CLS tokens
  of the whole batch, gathered from every worker differentiably under DDP.
* Student losses: 1 - cosine between the student's normed tokens and the
  (detached) mapped teacher tokens, one cosine per image over all its tokens
  flattened together; plus the same on the CLS token alone.

Teacher: a ViT's final-norm CLS + patch tokens, read from the store's
``tokens`` (DINOv2-S at 224 px: 1 + 256 tokens of 384). Student: a timm ViT
whose token grid matches at the render size (ViT-Ti/14 at 224 px in the paper).
The student's classifier is not part of the method; ``probe_weight`` trains
it on the detached pooled feature (a linear probe: no gradient reaches the
backbone), so validation top-1 measures the distilled features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from storage import UserError

from .losses import flat_cosine_loss, similarity_kl
from .base import Method, MethodContext, hard_loss, loss_parts, register_method

TEMPERATURES = tuple(round(0.01 * i, 2) for i in range(1, 11))  # 0.01 ... 0.10, the official recipe's


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward hands each worker the gradient of its own rows, summed over workers.

    Every worker computes the same loss from the gathered rows, so each worker's rows get a gradient from
    every worker; DDP then averages parameter gradients, and the sum here makes that average the
    single-process gradient of the whole batch. (Written out because torch.distributed.nn's all_gather,
    which does the same, is deprecated.)
    """

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``x`` (the same count on each: all workers take equal batches) in rank order,
    with gradients flowing back to each worker's own. Without torch.distributed (one process), ``x`` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    return _GatherRows.apply(x.contiguous())


def _grid(tokens: int, prefix: int) -> str:
    patches = tokens - prefix
    side = math.isqrt(patches)
    return f"{side}x{side} patches" if side * side == patches else f"{patches} patches"


@register_method("cospress")
class CosPress(Method):
    """local_weight * L_local + global_weight * L_global + token_weight * (1 - cos over all tokens)
    + cls_weight * (1 - cos of the CLS token) + probe_weight * CE of the linear probe."""

    needs = ("tokens",)
    student_needs = ("features", "tokens")

    def __init__(
        self,
        context: MethodContext,
        temperatures=TEMPERATURES,
        local_weight=1.0,
        global_weight=1.0,
        token_weight=1.0,
        cls_weight=1.0,
        probe_weight=1.0,
        hard_loss="ce",
    ):
        super().__init__()
        t_tokens, s_tokens = context.teacher_tokens, context.student_tokens
        teacher_dim = t_tokens[1] if t_tokens else context.teacher_dim
        if teacher_dim is None:
            raise UserError(
                "method 'cospress' needs the teacher's tokens: extract the teacher with --outputs features,tokens"
            )
        if t_tokens and context.teacher_token_prefix != 1:
            raise UserError(
                f"method 'cospress' needs a ViT teacher whose tokens start with a CLS token; this teacher's {t_tokens[0]} token(s) "
                "have none: use a ViT teacher such as dinov2_s"
            )
        if s_tokens and context.student_token_prefix != 1:
            raise UserError(
                "method 'cospress' needs a ViT student with a CLS token (e.g. vit_tiny_patch16_224 with patch_size=14 at 224 px); "
                "this student's tokens have none"
            )
        if t_tokens and s_tokens and s_tokens[0] != t_tokens[0]:
            size = f" at {context.size} px" if context.size else ""
            raise UserError(
                f"the student's token grid does not match the teacher's: the student gives {s_tokens[0]} tokens{size} "
                f"({_grid(s_tokens[0], 1)}), the teacher's cache holds {t_tokens[0]} ({_grid(t_tokens[0], 1)}); CosPress compares "
                "them one to one, so choose the student's patch size (--student-arg patch_size=P) or --size to give the teacher's grid"
            )
        student_dim = s_tokens[1] if s_tokens else context.student_dim
        self.temperatures = tuple(float(t) for t in temperatures)
        if not self.temperatures or min(self.temperatures) <= 0:
            raise UserError(f"cospress temperatures must be positive numbers, not {list(temperatures)}")
        self.local_weight, self.global_weight = local_weight, global_weight
        self.token_weight, self.cls_weight, self.probe_weight, self.hard_loss = (
            token_weight,
            cls_weight,
            probe_weight,
            hard_loss,
        )
        # The mapping compresses the teacher's space to the student's width; both similarity losses train it.
        self.map = nn.Sequential(nn.LayerNorm(teacher_dim), nn.Linear(teacher_dim, student_dim))

    def adapt_outputs(self, model, out):
        # The probe: the classifier on the detached feature, so labels never shape the distilled backbone.
        return {**out, "logits": model.get_classifier()(out["features"].detach())}

    def forward(self, student, teacher, targets):
        t_tokens = teacher["tokens"]  # (B, T, D_t): CLS then patches, after the teacher's final norm
        mapped = self.map(t_tokens)  # (B, T, D_s)
        local = similarity_kl(t_tokens, mapped, self.temperatures)  # over each image's tokens
        # Over the CLS tokens of the global batch: every worker computes the same value from all workers' rows.
        t_cls, m_cls = gather_rows(t_tokens[:, 0]), gather_rows(mapped[:, 0])  # (B_all, D_t), (B_all, D_s)
        glob = similarity_kl(t_cls[None], m_cls[None], self.temperatures)
        s_tokens = student["tokens"]  # (B, T, D_s)
        target = mapped.detach()  # the student chases the mapping; only the similarity losses move it
        tokens = flat_cosine_loss(s_tokens, target)
        cls = flat_cosine_loss(s_tokens[:, 0], target[:, 0])
        probe = hard_loss(self.hard_loss, student["logits"], targets)
        total = (
            self.local_weight * local
            + self.global_weight * glob
            + self.token_weight * tokens
            + self.cls_weight * cls
            + self.probe_weight * probe
        )
        return total, loss_parts(**{"local": local, "global": glob, "tokens": tokens, "cls": cls, "probe": probe})
