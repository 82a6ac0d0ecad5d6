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


# EXIF orientation is ignored, as timm's loader and Pillow ignore it: pixels in the order they are stored, at the size
# the header states (the size views are drawn for). torchcodec applies the tag, so a JPEG that has one goes to Pillow.
ORIENTATION = "exif-ignored"  # recorded with the library versions of every store


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes as a uint8 (3, H, W) RGB tensor; Pillow's exception when they are not an image."""
    decode_jpeg = jpeg_decoder() if data[:3] == JPEG_MAGIC and exif_orientation(data) == 1 else None
    if decode_jpeg is not None:
        try:
            return decode_jpeg(data, mode="RGB")
        except RuntimeError:
            pass  # damaged or unusual: Pillow decides, and names the fault in its own words
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return rgb_tensor(im)


def exif_orientation(data: bytes) -> int:
    """A JPEG's EXIF orientation tag (1: as stored, 2-8: flipped or turned), 1 without one, -1 when its EXIF cannot be read.

    Reads only the header segments before the image data (microseconds): the APP1 "Exif" segment's first IFD.
    """
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the headers are over
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
            return _tiff_orientation(data[i + 10 : i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return -1

    def number(at: int, size: int) -> int:
        if at + size > len(tiff):
            raise IndexError(at)
        return int.from_bytes(tiff[at : at + size], order)

    try:
        ifd = number(4, 4)
        for k in range(number(ifd, 2)):
            entry = ifd + 2 + 12 * k
            if number(entry, 2) == 0x0112:  # Orientation, a SHORT stored in the entry itself
                return number(entry + 8, 2)
    except IndexError:
        return -1
    return 1


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
