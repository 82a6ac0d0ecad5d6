"""Where a Hugging Face dataset's split is: its files in row order and the features ``datasets`` recorded, for a
local folder (``save_to_disk``'s Arrow files, or parquet files in the hub's layout) or a hub name.

Kept apart from ``HfDataset`` (``stages.data.hf_dataset``): finding the files is reading the layouts ``datasets``
writes, and refusing what is not one of them, before a row is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from storage import UserError


@dataclass(frozen=True)
class Split:
    """Where one split's rows are: its files in row order, Arrow or parquet, and the features ``datasets`` recorded."""

    name: str
    files: tuple[str, ...]
    parquet: bool
    features: dict | None  # datasets' ``Features.to_dict()`` (dataset_info.json's); None: the files' schema metadata


def find_split(name: str, split: str | None, role: str) -> Split:
    """The files of the split ``split`` (None: the default for ``role``, "train" or "val") of a local folder or hub name."""
    path, where = Path(name).expanduser(), f"hfds:{name}"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: a folder per split
            splits = _read_json(path / "dataset_dict.json", where).get("splits")
            if not isinstance(splits, list) or not splits:
                raise UserError(
                    f"{where}: {path / 'dataset_dict.json'} lists no splits: save the dataset again with save_to_disk"
                )
            chosen = choose_split([str(s) for s in splits], split, role, where)
            return _saved(path / chosen, chosen, where)
        if (
            path / "state.json"
        ).is_file():  # Dataset.save_to_disk: one split (datasets calls a dataset without one "train")
            own = _read_json(path / "state.json", where).get("_split") or "train"
            return _saved(path, choose_split([str(own)], split, role, where), where)
        by_split: dict[str, list[str]] = {}
        for file in sorted(path.rglob("*.parquet")):
            by_split.setdefault(_parquet_split(file.relative_to(path)), []).append(str(file))
        if by_split:
            chosen = choose_split(sorted(by_split), split, role, where)
            return Split(chosen, tuple(by_split[chosen]), True, None)
        raise UserError(
            f"{where}: {path} holds no dataset datasets wrote (state.json, dataset_dict.json or .parquet files): "
            "pass a folder written by save_to_disk, or one of parquet files (the hub's data/train-00000-of-00004.parquet ...)"
        )
    if path.exists() or name.startswith(("/", ".", "~")) or "://" in name:
        raise UserError(
            f"{where}: {path} is no folder: pass a local folder written by save_to_disk, one of parquet files, or a hub dataset name"
        )
    return _hub_split(name, split, role)


def choose_split(splits: list[str], asked: str | None, role: str, where: str) -> str:
    """``asked``, or the only split, or train (validation for validation data); a split the dataset lacks is one line."""
    if asked is None and len(splits) == 1:
        return splits[0]
    chosen = asked or ("validation" if role == "val" else "train")
    if chosen not in splits:
        flag = "--val-data" if role == "val" else "--data"
        raise UserError(
            f"{where} has no split '{chosen}' (its splits: {', '.join(splits)}): pass {flag} {where}?split=NAME"
        )
    return chosen


def _parquet_split(relative: Path) -> str:
    """The split of a parquet file by the hub's naming: ``data/train-00000-of-00004.parquet`` -> train; ``train/0.parquet`` -> train."""
    match = re.fullmatch(r"([A-Za-z]\w*?)(?:-\d+-of-\d+(?:-\w+)?)?\.parquet", relative.name)
    return match[1] if match else relative.parent.name


def _read_json(path: Path, where: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {path} ({e}): save the dataset again with save_to_disk") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: {path} holds no JSON object: save the dataset again with save_to_disk")
    return value


def _saved(folder: Path, split: str, where: str) -> Split:
    """One split written by ``save_to_disk``: its Arrow files (``state.json``) and features (``dataset_info.json``)."""
    state = _read_json(folder / "state.json", where)
    try:
        files = tuple(str(folder / f["filename"]) for f in state["_data_files"])
    except (KeyError, TypeError):
        raise UserError(
            f"{where}: {folder / 'state.json'} lists no Arrow files (_data_files): save the dataset again with save_to_disk"
        ) from None
    info = folder / "dataset_info.json"
    features = _read_json(info, where).get("features") if info.is_file() else None
    return Split(split, files, False, features if isinstance(features, dict) else None)


def _hub_split(name: str, split: str | None, role: str) -> Split:
    """A hub dataset through ``datasets.load_dataset`` (downloaded once, into its cache), read from its Arrow files."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"hfds:{name}: there is no folder {name}, and a hub dataset needs the datasets package: pip install datasets, "
            "or pass a local folder (written by save_to_disk, or the dataset's parquet files)"
        ) from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as e:
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"hfds:{name}: datasets.load_dataset cannot load it ({words}): check the name, or pass a local folder"
        ) from None
    chosen = choose_split(sorted(loaded), split, role, f"hfds:{name}")
    ds = loaded[chosen]
    files = tuple(f["filename"] for f in ds.cache_files)
    if not files:
        raise UserError(
            f"hfds:{name}: split {chosen} is held in memory, not in Arrow files: save it with save_to_disk and pass that folder"
        )
    return Split(chosen, files, False, ds.features.to_dict())
