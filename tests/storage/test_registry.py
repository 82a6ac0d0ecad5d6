"""Every registry (methods, data sources, teachers, store backends) refuses a second thing under a taken name."""

from __future__ import annotations

import pytest

from stages.data import datasets
from stages.methods import base
from stages.teachers import teachers
from storage import units
from storage.registry import Registry


def test_a_name_is_registered_once():
    registry = Registry("method")
    first = registry.add("kd", int)
    assert first is int and registry.add("kd", int) is int  # the same thing again: a module imported twice
    with pytest.raises(ValueError, match="method 'kd' is registered twice"):
        registry.add("kd", float)
    assert registry["kd"] is int


@pytest.mark.parametrize(
    "registry",
    [base._METHODS, datasets._DATASETS, teachers._TEACHERS, units._BACKENDS],
    ids=["methods", "sources", "teachers", "backends"],
)
def test_the_four_registries_are_one_kind(registry):
    assert isinstance(registry, Registry) and registry
    name = next(iter(registry))
    with pytest.raises(ValueError, match=f"'{name}' is registered twice"):
        registry.add(name, object())
