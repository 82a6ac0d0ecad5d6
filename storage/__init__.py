"""The cache store: arrays written in committed units, at a path or fsspec URL. Knows nothing of torch models.

Importing the package registers the store backends, so ``Store`` finds each by the ``format`` a
teacher.json names; a new backend is one more module with a ``@register_backend`` class, imported here.
"""

from .errors import UserError
from .location import Location
from .store import Store
from .store_record import DatasetRecord, OrderRecord, PlanRecord, StoreRecord
from .teacher_record import TeacherRecord
from .units import ArraySpec, CommittedUnits, DamagedUnit, list_backends, register_backend
from .zarr_units import UnitArrays  # registers "zarr" (first: the order a miss lists them in)
from .wds import TarUnits  # registers "wds"

__all__ = [
    "ArraySpec",
    "CommittedUnits",
    "DamagedUnit",
    "DatasetRecord",
    "Location",
    "OrderRecord",
    "PlanRecord",
    "Store",
    "StoreRecord",
    "TarUnits",
    "TeacherRecord",
    "UnitArrays",
    "UserError",
    "list_backends",
    "register_backend",
]
