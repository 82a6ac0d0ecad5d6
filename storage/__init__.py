"""The cache store: zarr arrays written in committed units. Knows nothing of torch models."""

from .errors import UserError
from .store import ArraySpec, Store, UnitArrays, read_json, write_json_atomic

__all__ = ["ArraySpec", "Store", "UnitArrays", "UserError", "read_json", "write_json_atomic"]
