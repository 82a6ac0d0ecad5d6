"""A value of the wrong type anywhere in a file the tool reads is one line naming the file and the key.

Two walks: every declared setting (training, views, prepare, each method's) with a value of each type, through
the same recipe reader every command uses (``load_recipe``); and every field of a store's records (store.json,
teacher.json, a commit record), each given a value of another type, through ``verify``. No case may end in
a traceback or be read as something else.
"""

from __future__ import annotations

import inspect
import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.settings.recipe import load_recipe, train_settings
from stages.data.prepare import PrepareSettings
from stages.data.views import ViewRecipe
from stages.methods import list_methods, method_class
from stages.settings import check_fields, declared
from stages.training.settings import TrainSettings
from storage import UserError

# One value of each type YAML can hold.
VALUES = {
    "word": "abc",
    "list": [1, 2],
    "mapping": {"a": 1},
    "fraction": 2.5,
    "boolean": True,
    "null": None,
    "negative": -3,
}


def _recipe(tmp_path, data: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _read(path) -> str | None:
    """None when the recipe was accepted, else the one line it was refused with; any other exception fails the test."""
    try:
        load_recipe(path)
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    return None


@pytest.mark.parametrize("section", ["training", "views"])
def test_every_recipe_setting_of_each_wrong_type_is_one_line_naming_file_and_key(section, tmp_path):
    cls = TrainSettings if section == "training" else ViewRecipe
    for name, check in declared(cls).items():
        refused = 0
        for label, value in VALUES.items():
            data = {name: value} if section == "training" else {"views": {name: value}}
            line = _read(_recipe(tmp_path, data))
            if line is not None:
                assert name in line and "recipe.yaml" in line, (name, label, line)
                refused += 1
            elif value is not None:  # accepted (null leaves a setting at its default): a value its own check takes
                check(value, name)
        assert refused >= 4, f"{name} ({check.what}) refused only {refused} of {len(VALUES)} types"


@pytest.mark.parametrize("method", list_methods())
def test_every_method_setting_of_each_wrong_type_is_one_line(method):
    settings = list(inspect.signature(method_class(method).__init__).parameters)[2:]  # after self and the context
    assert settings, method
    for name in settings:
        for label, value in VALUES.items():
            try:
                train_settings({"method": method, "method_args": {name: value}}, {}, "recipe.yaml")
            except UserError as e:
                assert name in str(e) and "recipe.yaml" in str(e) and "\n" not in str(e), (method, name, label, str(e))


def test_every_prepare_setting_of_each_wrong_type_is_one_line():
    for name in declared(PrepareSettings):
        refused = 0
        for value in VALUES.values():
            try:
                check_fields(PrepareSettings, {name: value}, "prepare flags")
            except UserError as e:
                assert f"{name} in prepare flags" in str(e)
                refused += 1
        assert refused >= 4, name


@pytest.mark.parametrize("shape", [3, "abc", [1, 2]], ids=["number", "word", "list"])
def test_a_section_or_a_part_of_the_wrong_shape_is_one_line(shape, tmp_path):
    for data in (
        {"views": shape},
        {"method": [{"method": "kd", "args": shape}]},
        {"method": [{"method": "kd", "teacher": [shape]}]},
        {"method_args": shape},
        {"student_kwargs": shape},
    ):
        line = _read(_recipe(tmp_path, data))
        assert line is not None and "recipe.yaml" in line, (data, line)


# -- records --------------------------------------------------------------------------------------------

RECORDS = [
    "store.json",
    "teachers/t1/teacher.json",
    "teachers/t1/commits/v000000-b000000.json",
    "plan/commits/v000001-b000001.json",
]


def _leaves(data, path=()):
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, (*path, key))
    elif path:
        yield path, data


def _other_type(value):
    """A value of another JSON type than ``value``'s."""
    if isinstance(value, str):
        return 5
    if isinstance(value, list):
        return "abc"
    return [1] if isinstance(value, dict) else "abc"


@pytest.mark.parametrize("record", RECORDS)
def test_every_record_field_of_another_type_is_refused_in_one_line(record, store_copy, capsys):
    file = store_copy / record
    original = file.read_text()
    for path, value in _leaves(json.loads(original)):
        data = json.loads(original)
        at = data
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = _other_type(value)
        file.write_text(json.dumps(data))
        capsys.readouterr()
        assert main(["verify", str(store_copy), "--replay", "0"]) == 2, path
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (path, err)
        assert "damaged" in err or path == ("format",), (path, err)  # a store format this version does not know says so
        if "commits" not in record:  # a commit record's damage is a bad unit, counted with the others
            named = [".".join(path[:n]) for n in range(1, len(path) + 1)]  # the field, or the mapping holding it
            assert any(f"field '{n}'" in err for n in named) or path == ("format",), (path, err)
    file.write_text(original)
    assert main(["verify", str(store_copy), "--replay", "0"]) == 0
