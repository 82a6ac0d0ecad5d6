"""Counter-based uniforms: a view's random numbers as a pure function of (seed, view, sample id, stream)."""

from __future__ import annotations

import math

import numpy as np


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 (wraps on purpose)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, view: int, ids: np.ndarray, stream: int, count: int) -> np.ndarray:
    """Uniform floats in [0, 1), shape (len(ids), count), a pure function of the arguments.

    ``stream`` separates the ops, so adding an op never changes another op's draws.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    h = _mix(np.full(1, seed, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    h = _mix(h ^ np.uint64(view))
    h = _mix(h ^ np.uint64(stream))
    h = _mix(h ^ ids)[:, None]  # (n, 1)
    h = _mix(h ^ np.arange(count, dtype=np.uint64)[None, :])  # (n, count)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _gauss(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normals from two uniforms in [0, 1) (Box-Muller)."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)
