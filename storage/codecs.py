"""Compression of stored arrays: one place that picks the codec for a dtype.

Chosen with ``benchmarks/store.py`` (stored bytes per view in the product's shard
layout; synthetic strong-teacher outputs and a real timm teacher):

* float16 (top-k logits, target logit, features): byte-shuffle. It puts the
  sign/exponent bytes of neighbouring values together; sorted top-k logits share
  them, and zstd then beats bit-shuffle by about 13% (12.7 vs 14.6 B per view)
  and on features compresses 1.12x where bit-shuffle gives 1.00x.
* int16 / int32 (class indices) and float32 (log-sum-exp, crop boxes): bit-shuffle,
  whose zero high bit-planes make indices below 1000 cost about 12.7 B per 10.
* int8 (quantised features): no shuffle; one-byte values gain nothing from byte
  planes and bit planes scatter them (577 vs 670 B per 768-d vector).
* uint8 (flags, op choices): bit-shuffle, a one-bit flag costs about 0.4 B.

zstd at blosc level 5 throughout: level 9 saves under 5% and encodes 10-100x slower.
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec

CNAME, CLEVEL = "zstd", 5


def shuffle_for(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return "shuffle"
    if dtype == np.int8:
        return "noshuffle"
    return "bitshuffle"


def compressor(dtype) -> BloscCodec:
    return BloscCodec(cname=CNAME, clevel=CLEVEL, shuffle=shuffle_for(dtype), typesize=np.dtype(dtype).itemsize)
