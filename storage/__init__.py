"""The cache store: arrays written in committed units, at a path or fsspec URL. Knows nothing of torch models."""

from .errors import UserError
from .location import Location
from .store import ArraySpec, CommittedUnits, DamagedUnit, Store, UnitArrays

__all__ = ["ArraySpec", "CommittedUnits", "DamagedUnit", "Location", "Store", "UnitArrays", "UserError"]
