"""Encoded images to uint8 (3, H, W) RGB tensors: the one decode every source, view and teacher goes through.

Once the teacher is cached, decoding is most of what a replayed view costs, so
this is the hot path of every distillation epoch. JPEGs go to torchcodec's
libjpeg-turbo decoder (the successor of ``torchvision.io``'s, which torchvision
0.29 deprecates): about 1.0 ms for a 500x375 JPEG against Pillow's 1.6, and the
same bytes (tests/stages/data/test_decode.py checks qualities, subsamplings,
progressive, grey and CMYK files against Pillow). Anything else, a JPEG that
decoder refuses (damaged: Pillow then says what is wrong), or a machine where
torchcodec cannot load (it needs torch >= 2.11) goes to Pillow. Either way the
pixels are the same, and the views' fingerprints would say so if they were not.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings

import numpy as np
import torch

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


@functools.cache
def jpeg_decoder():
    """torchcodec's ``decode_jpeg``, or None where it cannot load (then Pillow decodes every image)."""
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception as e:  # not installed, or built for another torch: its native library fails to load
        log.info("torchcodec cannot load (%s); JPEGs are decoded by Pillow (the same pixels, about 1.6x slower)", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return decode_jpeg


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes as a uint8 (3, H, W) RGB tensor; Pillow's exception when they are not an image."""
    decode_jpeg = jpeg_decoder() if data[:3] == JPEG_MAGIC else None
    if decode_jpeg is not None:
        try:
            return decode_jpeg(data, mode="RGB")
        except RuntimeError:
            pass  # damaged or unusual: Pillow decides, and names the fault in its own words
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return rgb_tensor(im)


def rgb_tensor(image) -> torch.Tensor:
    """An opened PIL image as a uint8 (3, H, W) RGB tensor (an (H, W, 3) array seen channels first).

    No byte is copied that need not be: an RGB image (most JPEGs) skips
    ``convert("RGB")``, which would copy it, and the tensor wraps the bytes
    Pillow hands over instead of copying them again (together about a tenth
    of a 500x375 JPEG's decode through Pillow: 1.76 -> 1.58 ms).
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    with warnings.catch_warnings():
        # The bytes are read-only, and this tensor is their only owner: no one else sees a write.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)
