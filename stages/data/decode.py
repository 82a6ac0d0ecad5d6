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

import contextlib
import functools
import io
import logging
import os
import tempfile
import threading
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
        log.info(
            "torchcodec cannot load (%s); JPEGs are decoded by Pillow (the same pixels, about 1.6x slower)",
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return None
    return decode_jpeg


# EXIF orientation is ignored, as timm's loader and Pillow ignore it: pixels in the order they are stored, at the size
# the header states (the size views are drawn for). torchcodec applies the tag, so a JPEG that has one goes to Pillow.
ORIENTATION = "exif-ignored"  # recorded with the library versions of every store


def decode_image(data: bytes, name: str = "an image") -> torch.Tensor:
    """Encoded image bytes as a uint8 (3, H, W) RGB tensor; Pillow's exception when they are not an image.
    ``name`` (a file, a shard's sample) is what a log line about the image calls it.

    Every decode is bounded by Pillow's pixel limit (``PIL.Image.MAX_IMAGE_PIXELS``), read from the header before
    anything is allocated: a few hundred bytes can claim 20000 x 20000 pixels (1.2 GB decoded).
    """
    from PIL import Image

    decode_jpeg = None
    if data[:3] == JPEG_MAGIC:
        orientation, height, width = jpeg_header(data)
        check_pixels(height, width)
        decode_jpeg = jpeg_decoder() if orientation == 1 and height else None
    if decode_jpeg is not None:
        try:
            with libjpeg_messages(name):
                return decode_jpeg(data, mode="RGB")
        except Exception:
            pass  # damaged or unusual: Pillow decides (it reads what it can), and names the fault in its own words
    with Image.open(io.BytesIO(data)) as im:
        check_pixels(im.height, im.width)
        return rgb_tensor(im)


_STDERR_LOCK = threading.Lock()
_TOLD: set[str] = set()


@contextlib.contextmanager
def libjpeg_messages(name: str, jpeg: bool = True):
    """libjpeg-turbo, inside torchcodec, prints its warnings ("Corrupt JPEG data: 3 extraneous bytes before marker
    0xd9") straight to the process's standard error, where they break a command's console lines and miss its log.
    Around a JPEG decode, standard error goes to a file, and what libjpeg wrote becomes one warning in the log.

    On the hot path: three system calls and an uncontended lock, a few microseconds of a millisecond's decode; the
    file is read only when something was written to it (its offset moved). Another thread writing to standard error
    in that moment is logged with it rather than lost."""
    if not jpeg:
        yield
        return
    with _STDERR_LOCK:
        sink = _stderr_sink(os.getpid())  # one per process: a forked loader must not share the parent's file offset
        saved = os.dup(2)  # fd 2 as it is now (a test's capture, a pipe): restored whatever it was
        os.dup2(sink, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            written = os.lseek(sink, 0, os.SEEK_CUR)
            text = ""
            if written:
                os.lseek(sink, 0, os.SEEK_SET)
                text = " ".join(os.read(sink, written).decode(errors="replace").split())
                os.ftruncate(sink, 0)
                os.lseek(sink, 0, os.SEEK_SET)
    if text and name not in _TOLD:  # once per image and process, not once per epoch
        _TOLD.add(name)
        log.warning("%s: libjpeg says %r; decoded as libjpeg decodes it (as Pillow does)", name, text[:300])


@functools.cache
def _stderr_sink(pid: int) -> int:
    """A descriptor of an unnamed temporary file (this process's own) that libjpeg's messages land in."""
    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())  # the duplicate outlives the file object; the unnamed file lives while it is open


# The last bytes of a whole file of these formats: JPEG's end-of-image marker, PNG's IEND chunk with its CRC.
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def ends_whole(im) -> bool:
    """Whether an opened Pillow image's file ends with its format's end marker (formats without one: True). A read of
    a few bytes where the header pass has the file open already; a truncated JPEG or PNG fails it."""
    marker = END_MARKERS.get(im.format)
    if marker is None:
        return True
    try:
        im.fp.seek(-len(marker), 2)
        return im.fp.read(len(marker)) == marker
    except OSError:
        return False  # shorter than the marker


def header_size(im, name: str) -> tuple[int, int]:
    """(height, width) of an opened Pillow image, from its header. A file that does not end with its format's end
    marker is decoded whole now: a truncated one fails here (Pillow's exception), one with bytes after the marker
    (some cameras append data) passes. ``name`` is what a libjpeg warning calls the image."""
    if not ends_whole(im):
        with libjpeg_messages(name, im.format == "JPEG"):
            im.load()
    return im.height, im.width


def check_pixels(height: int, width: int) -> None:
    """Refuse an image whose header claims more pixels than Pillow's limit (what Pillow calls a decompression bomb)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > limit:
        raise ValueError(
            f"its header claims {width} x {height} pixels, over the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS): "
            "a damaged file or a decompression bomb"
        )


SOF_MARKERS = {m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)}  # start of frame: the image's size


def jpeg_header(data: bytes) -> tuple[int, int, int]:
    """(EXIF orientation, height, width) from a JPEG's header segments, read before the image data (microseconds).

    Orientation: 1 as stored (also without EXIF), 2-8 flipped or turned, -1 when its EXIF cannot be read.
    Height and width: 0 when no frame header comes before the image data (then Pillow reads the file).
    """
    orientation, height, width = 1, 0, 0
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
            orientation = _tiff_orientation(data[i + 10 : i + 2 + length])
        elif marker in SOF_MARKERS and i + 9 <= n:
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + length
    return orientation, height, width


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
