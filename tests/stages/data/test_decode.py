"""The one image decode: torchcodec's JPEG decoder gives Pillow's pixels, and damaged files still fail with Pillow's words."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
from PIL import Image

from stages.data import decode
from stages.data.decode import decode_image


def _photo(w=131, h=97) -> Image.Image:
    # Smooth gradients plus noise: chroma detail that subsampling and the IDCT must get exactly right.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def _encoded(image: Image.Image, fmt="JPEG", **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


JPEGS = {
    **{f"q{q}-subsampling{s}": dict(quality=q, subsampling=s) for q in (50, 90, 100) for s in (0, 1, 2)},
    "progressive": dict(quality=85, progressive=True),
    "optimized": dict(quality=75, optimize=True),
}


def test_torchcodec_loads_here():
    # The fast path is what users get from the install command; a test run without it would test Pillow twice.
    assert decode.jpeg_decoder() is not None


@pytest.mark.parametrize("name", JPEGS)
def test_jpegs_decode_to_pillows_pixels(name):
    data = _encoded(_photo(), **JPEGS[name])
    np.testing.assert_array_equal(decode_image(data).permute(1, 2, 0).numpy(), _pillow(data))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grey_and_cmyk_jpegs_decode_to_pillows_rgb(mode):
    data = _encoded(_photo().convert(mode), quality=90)
    image = decode_image(data)
    assert image.shape == (3, 97, 131)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), _pillow(data))


def test_other_formats_go_to_pillow():
    palette = _encoded(_photo().quantize(16), "PNG")
    np.testing.assert_array_equal(decode_image(palette).permute(1, 2, 0).numpy(), _pillow(palette))


def test_without_torchcodec_the_pixels_are_the_same(monkeypatch):
    data = _encoded(_photo(), quality=90)
    fast = decode_image(data)
    monkeypatch.setattr(decode, "jpeg_decoder", lambda: None)
    assert decode_image(data).equal(fast)


def test_a_truncated_jpeg_fails_with_pillows_words():
    data = _encoded(_photo(), quality=90)
    with pytest.raises(OSError, match="truncated"):
        decode_image(data[: len(data) // 2])


def _tiff(order: str, tag: int, value: int) -> bytes:
    """A one-entry EXIF IFD (a SHORT) in either byte order, as the payload of a JPEG's APP1 segment."""
    end = {"II": "little", "MM": "big"}[order]
    entry = tag.to_bytes(2, end) + (3).to_bytes(2, end) + (1).to_bytes(4, end) + value.to_bytes(2, end) + b"\0\0"
    return (
        b"Exif\0\0"
        + order.encode()
        + (42).to_bytes(2, end)
        + (8).to_bytes(4, end)
        + (1).to_bytes(2, end)
        + entry
        + b"\0\0\0\0"
    )


@pytest.mark.parametrize("order", ["II", "MM"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_ignored_as_pillow_and_timm_ignore_it(orientation, order, monkeypatch):
    # torchcodec turns and flips an image by its EXIF tag; timm's loader (Pillow) keeps the stored pixels, at the
    # header's size, which is the size views are drawn for. Every path must give those, with or without torchcodec.
    data = _encoded(_photo(), quality=90, exif=_tiff(order, 0x0112, orientation))
    assert decode.jpeg_header(data)[0] == orientation
    image = decode_image(data)
    assert image.shape == (3, 97, 131)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), _pillow(data))
    monkeypatch.setattr(decode, "jpeg_decoder", lambda: None)
    assert decode_image(data).equal(image)


def test_exif_without_orientation_keeps_the_fast_path_and_a_broken_one_goes_to_pillow():
    other_tag = _encoded(_photo(), quality=90, exif=_tiff("II", 0x010F, 7))  # Make, not Orientation
    assert decode.jpeg_header(other_tag)[0] == 1 and decode.jpeg_header(_encoded(_photo(), quality=90))[0] == 1
    broken = _encoded(_photo(), quality=90, exif=_tiff("II", 0x0112, 6)[:14])  # the IFD cut short
    assert decode.jpeg_header(broken)[0] == -1
    np.testing.assert_array_equal(decode_image(broken).permute(1, 2, 0).numpy(), _pillow(broken))


def test_a_folder_of_turned_jpegs_replays_at_its_header_sizes(tmp_path):
    from stages.data.datasets import open_dataset

    for k, orientation in enumerate((1, 6, 8, 3)):
        (tmp_path / "c").mkdir(exist_ok=True)
        (tmp_path / "c" / f"{k}.jpg").write_bytes(_encoded(_photo(), quality=90, exif=_tiff("II", 0x0112, orientation)))
    data = open_dataset(f"folder:{tmp_path}")
    for i in range(len(data)):
        assert tuple(data.image(i).shape[1:]) == tuple(data.sizes()[i]) == (97, 131)


def _claiming(data: bytes, height: int, width: int) -> bytes:
    """``data`` with its frame header patched to claim another size (a few hundred bytes can claim 20000 x 20000)."""
    _, h, w = decode.jpeg_header(data)
    at = data.index(h.to_bytes(2, "big") + w.to_bytes(2, "big"))
    return data[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 4 :]


@pytest.mark.parametrize("torchcodec", [True, False])
def test_a_jpeg_claiming_too_many_pixels_is_refused_before_it_is_decoded(torchcodec, monkeypatch, tmp_path):
    data = _encoded(_photo(), quality=90)
    assert decode.jpeg_header(data)[1:] == (97, 131)
    bomb = _claiming(data, 20000, 20000)
    if not torchcodec:
        monkeypatch.setattr(decode, "jpeg_decoder", lambda: None)
    with pytest.raises(ValueError, match="claims 20000 x 20000 pixels, over the limit of 89,478,485"):
        decode_image(bomb)
    # the same limit on every path: Pillow's, as the user set it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 97 * 131 - 1)
    with pytest.raises(ValueError, match="claims 131 x 97 pixels"):
        decode_image(data)
    png = _encoded(_photo().resize((16, 16)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # Pillow itself refuses only above twice its limit (400 here)
    with pytest.raises(ValueError, match="claims 16 x 16 pixels"):
        decode_image(png)


def test_a_folder_image_claiming_too_many_pixels_is_one_line_naming_it(tmp_path):
    from stages.data.datasets import open_dataset
    from storage import UserError

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bomb.jpg").write_bytes(_claiming(_encoded(_photo(), quality=90), 20000, 20000))
    with pytest.raises(
        UserError,
        match=r"cannot decode image .*bomb\.jpg: its header claims 20000 x 20000 pixels.*replace the file, or remove it",
    ):
        open_dataset(f"folder:{tmp_path}").image(0)


# A 16 x 12 lossless JPEG (SOF3, predictor 1: libjpeg-turbo 3's lossless mode), which Pillow reads.
LOSSLESS_JPEG = base64.b64decode(
    "/9j/7gAOQWRvYmUAZAAAAAAA/8MAEQgADAAQA1IRAEcRAEIRAP/EABcAAAMBAAAAAAAAAAAAAAAAAAAEBQj/2gAMA1IARwBCAAEAAM/5/wA/0BigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBgqMUBigMUBigMUBigMUBigMUBigMUBigMUBigMUBj//2Q=="
)


@pytest.mark.parametrize("torchcodec", [True, False])
def test_a_lossless_jpeg_decodes_as_pillow_reads_it(torchcodec, monkeypatch):
    if not torchcodec:
        monkeypatch.setattr(decode, "jpeg_decoder", lambda: None)
    np.testing.assert_array_equal(decode_image(LOSSLESS_JPEG).permute(1, 2, 0).numpy(), _pillow(LOSSLESS_JPEG))


def test_libjpegs_warning_goes_to_the_log_not_the_console(capfd, monkeypatch):
    # libjpeg-turbo (in torchcodec) prints "Corrupt JPEG data: ..." to file descriptor 2, past Python's logging.
    data = _encoded(_photo(), quality=90)
    end = data.rindex(b"\xff\xd9")
    corrupt = data[:end] + b"\x00\x01\x02" + data[end:]  # bytes before the end marker: libjpeg warns and decodes
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("stages.data.decode")
    monkeypatch.setattr(logger, "propagate", False)  # this test's handler alone: not another test's console
    logger.addHandler(handler)
    try:
        image = decode_image(corrupt, "c1/corrupt.jpg")
        assert image.shape == (3, 97, 131)
        assert capfd.readouterr().err == ""
        assert len(said) == 1 and said[0].startswith("c1/corrupt.jpg: libjpeg says 'Corrupt JPEG data"), said
        decode_image(corrupt, "c1/corrupt.jpg")  # the next epoch's decode of the same file says nothing again
        assert len(said) == 1 and capfd.readouterr().err == ""
    finally:
        logger.removeHandler(handler)
