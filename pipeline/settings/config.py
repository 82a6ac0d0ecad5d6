"""Configuration as data: YAML recipes under configs/, overridden by the command line, always saved.

Resolution order for every setting: command-line flag, then ``--config FILE``,
then the default its declaration gives (a method's settings: its constructor's,
the paper's). A flag left unset (``None``) never overrides anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from storage import UserError
from storage.local_files import written_whole


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/, beside pipeline/


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def recipe(name: str) -> dict:
    """A YAML recipe shipped in configs/ (``demo``, ``vanillakd_a2``); empty when there is none."""
    path = CONFIG_DIR / f"{name}.yaml"
    return load_yaml(path) if path.is_file() else {}


def parse_pairs(pairs: list[str] | None, flag: str) -> dict:
    """``["temperature=4", "channels=[8,16]"]`` -> ``{"temperature": 4, "channels": [8, 16]}`` (YAML values);
    ``["kd.temperature=4"]`` -> ``{"kd": {"temperature": 4}}``."""
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        part, dot, key = name.strip().rpartition(".")  # PART.KEY: a setting of one part of a composite method
        key = key.replace("-", "_")
        if not sep or not key.isidentifier() or (dot and not part):
            raise UserError(f"{flag} takes KEY=VALUE (or PART.KEY=VALUE) with KEY a setting's name, not '{pair}'")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"{flag} {pair}: the value is not valid YAML ({str(e).splitlines()[0]})") from e
        if dot:
            out.setdefault(part, {})[key] = parsed
        else:
            out[key] = parsed
    return out


def merge(*layers: dict) -> dict:
    """Later layers win; nested dicts merge; ``None`` values are skipped."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def dump(config: dict) -> str:
    return yaml.safe_dump(_plain(config), sort_keys=False)


def save(path: Path, config: dict) -> None:
    """Write ``config`` as YAML through a rename: the file is the old one or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as tmp:
        tmp.write_text(dump(config))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
