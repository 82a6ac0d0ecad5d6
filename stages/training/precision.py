"""The arithmetic of a training step: float32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)."""

from __future__ import annotations

import contextlib

import torch

from storage import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``autocast()`` for the forward passes and ``scaler`` for the backward pass of one device.

    With ``amp=None`` both do nothing, so the float32 path is exactly the plain one
    (the cache == online invariant is bit for bit on it).
    """

    def __init__(self, amp: str | None, device):
        self.amp, self.device_type = amp, torch.device(device).type
        if amp is not None and amp not in AMP_DTYPES:
            raise UserError(f"--amp must be one of {', '.join(AMP_DTYPES)}, not '{amp}'")
        if amp == "fp16" and self.device_type != "cuda":
            raise UserError(
                f"--amp fp16 needs a CUDA device (this run is on {self.device_type}): use --amp bf16, which CPUs run too"
            )
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device_type if amp == "fp16" else "cpu", enabled=amp == "fp16")

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])
