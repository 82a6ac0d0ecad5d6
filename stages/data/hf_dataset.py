"""A Hugging Face dataset as the input dataset: ``hfds:PATH_OR_NAME``, the data timm's ``hfds/`` reader reads.

``PATH`` is a local folder in a layout the ``datasets`` package writes (found by ``stages.data.hf_splits``):

* ``Dataset.save_to_disk``: Arrow stream files listed in ``state.json``, the features in ``dataset_info.json``;
  ``DatasetDict.save_to_disk``: one such folder per split, listed in ``dataset_dict.json``.
* Parquet files, the hub's layout (``data/train-00000-of-00004.parquet``): a file's split is its name up to
  ``-NNNNN-of-NNNNN`` (or ``.parquet``), else the folder it is in (``train/0000.parquet``); the features are in
  each file's schema metadata (``b"huggingface"``).

Any other name (``ILSVRC/imagenet-1k``) is a hub dataset: ``datasets.load_dataset`` fetches it where ``datasets``
is installed (``pip install datasets``), and its rows are read from the Arrow files of its cache.

* Split: ``?split=NAME``; without it, a dataset of one split gives that one, else ``train`` (``validation`` for
  validation data: ``validation_data`` opens it when no ``--val-data`` is given).
* Columns: ``?image=`` (default ``image``) holds HF's Image feature, ``{bytes, path}`` structs (the bytes, else
  the file at ``path``), or plain bytes; ``?label=`` (default ``label``) the class numbers, named by the feature's
  ClassLabel ``names`` where the metadata has them, else ``"0"``..``"N-1"``.
* Ids follow the rows (files in name order, or as ``state.json`` lists them). Keys are ``SPLIT/ROW``, plus
  ``/PATH`` where the image has a path: the fingerprint (keys and labels) tells splits, orders and relabellings apart.
* Reading: opening reads the label and path columns, never an image. Arrow files are memory-mapped, so a row is
  read in place, in any order (a store permutes the ids). Parquet is read a row group at a time (``datasets``
  writes image datasets in row groups of 100 rows), the last few kept: a parquet source is ``sequential``, its
  blocks follow the rows and read each row group once (``encoded``), and ``order_note`` says when the rows are
  in class order. ImageNet's 1.28 M rows cost their labels and paths in memory, not their 140 GB of images.
* Image sizes (``sizes``) come from every image's header, read once and cached beside the ``wds:`` shard indexes,
  keyed by the files' paths, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from storage import UserError
from storage.store_record import MAX_CLASSES

from .decode import decode_image, header_size
from .hf_splits import find_split
from .image_dataset import ImageDataset
from .wds_dataset import class_order
from .wds_index import index_cache_dir


log = logging.getLogger(__name__)

GROUPS_KEPT = 4  # parquet row groups kept per process: a block's rows span a few, read in row order
SIZES_VERSION = 1

# What to do about an unreadable image: changing the rows changes the data, which a store made from them then refuses.
BAD_ROW_FIX = "replace or remove the row, and write a new store: a store made from this dataset refuses changed data"


def _features(schema) -> dict:
    """The features ``datasets`` writes into an Arrow or parquet schema's metadata ({} where it wrote none)."""
    try:
        return json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"] or {}
    except (KeyError, TypeError, ValueError):
        return {}


def _class_names(feature) -> list[str] | None:
    """A ClassLabel feature's names, or None (not a ClassLabel, or one without names)."""
    if (
        isinstance(feature, dict)
        and feature.get("_type") == "ClassLabel"
        and isinstance(feature.get("names"), list)
        and feature["names"]
    ):
        return [str(n) for n in feature["names"]]
    return None


class HfDataset(ImageDataset):
    """The rows of one split of a Hugging Face dataset (see the module docstring); ``role``: "train" or "val"."""

    def __init__(
        self, name: str, split: str | None = None, role: str = "train", *, image: str = "image", label: str = "label"
    ):
        found = find_split(name, split, role)
        self.name, self.split, self.image_column, self.label_column = name, found.name, image, label
        options = [("split", found.name)] if found.name != "train" else []  # train: what a training source opens
        options += [(k, v) for k, v, default in (("image", image, "image"), ("label", label, "label")) if v != default]
        self.source = f"hfds:{name}" + ("?" + "&".join(f"{k}={v}" for k, v in options) if options else "")
        self.files, self.parquet = list(found.files), found.parquet
        self.sequential = found.parquet  # a row group is read whole: random ids would read one per image
        self._handles, self._columns, self._groups = {}, {}, OrderedDict()
        self._sizes = None
        # Parts: an Arrow file, or a parquet row group; each with its file, row group (-1: a whole file) and first row.
        part_file, part_group, counts, labels, paths, features = [], [], [], [], [], found.features
        for f in range(len(self.files)):
            schema = self._check_columns(f)
            if features is None:
                features = _features(schema)
            handle = self._handle(f)
            if self.parquet:
                meta = handle.metadata
                part_file += [f] * meta.num_row_groups
                part_group += list(range(meta.num_row_groups))
                counts += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                labels.append(handle.read(columns=[label]).column(0))
                has_path = "path" in _struct_fields(schema.field(image).type)  # only the paths: the images stay on disk
                paths.append(
                    (
                        _field(handle.read(columns=[f"{image}.path"]).column(0), "path") if has_path else None,
                        meta.num_rows,
                    )
                )
            else:
                part_file.append(f)
                part_group.append(-1)
                counts.append(handle.num_rows)
                labels.append(handle.column(label))
                paths.append((self._image_fields(handle.column(image))[1], handle.num_rows))
        self._part_file, self._part_group = np.asarray(part_file, np.int64), np.asarray(part_group, np.int64)
        # (parts + 1,) the first row of each part, then the count
        self._starts = np.r_[0, np.cumsum(counts, dtype=np.int64)]
        self.labels = self._read_labels(labels)
        self.keys = self._make_keys(paths)
        if not len(self.keys):
            raise UserError(f"{self.source}: split {self.split} has no rows: choose another with ?split=NAME")
        self._set_classes(features or {})

    # -- opening ---------------------------------------------------------------------------------

    def _handle(self, f: int):
        """File ``f`` open: a memory-mapped Arrow table (nothing read until a row is) or a ``ParquetFile``."""
        if f not in self._handles:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = self.files[f]
            try:
                if self.parquet:
                    self._handles[f] = pq.ParquetFile(path)  # positioned reads: a forked loader worker shares it safely
                else:
                    mapped = pa.memory_map(path)
                    try:  # datasets writes Arrow streams; an Arrow file (with a footer) reads as well
                        self._handles[f] = pa.ipc.open_stream(mapped).read_all()
                    except pa.ArrowInvalid:
                        self._handles[f] = pa.ipc.open_file(mapped).read_all()
            except (OSError, pa.ArrowException) as e:
                raise UserError(
                    f"{self.source}: cannot read {path} ({e}): the dataset changed or is damaged; write it again"
                ) from None
        return self._handles[f]

    def __getstate__(self):
        # files are opened again in each process
        return {**self.__dict__, "_handles": {}, "_columns": {}, "_groups": OrderedDict()}

    def _check_columns(self, f: int):
        """File ``f``'s schema, with an image and a label column as named; a miss is one line listing the columns."""
        import pyarrow as pa

        handle = self._handle(f)
        schema = handle.schema_arrow if self.parquet else handle.schema
        for what, column in (("image", self.image_column), ("label", self.label_column)):
            if column not in schema.names:
                raise UserError(
                    f"{self.source}: no column '{column}' in split {self.split} (its columns: {', '.join(schema.names)}): pass ?{what}=COLUMN"
                )
        kind = schema.field(self.image_column).type
        if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or "bytes" in _struct_fields(kind)):
            raise UserError(
                f"{self.source}: column '{self.image_column}' holds {kind}, not images (HF's Image feature, or bytes): pass ?image=COLUMN"
            )
        if not pa.types.is_integer(schema.field(self.label_column).type):
            raise UserError(
                f"{self.source}: column '{self.label_column}' holds {schema.field(self.label_column).type}, not class numbers: pass ?label=COLUMN"
            )
        return schema

    def _read_labels(self, columns) -> np.ndarray:
        """The label columns of every file as one (N,) int64 array; a row without a class is one line."""
        labels = np.concatenate(
            [np.asarray(c.fill_null(-1).to_numpy(), np.int64) for c in columns] or [np.zeros(0, np.int64)]
        )
        if len(labels) and labels.min() < 0:  # -1 (or no value) is datasets' mark of an unlabelled row
            i = int(np.argmin(labels))
            raise UserError(
                f"{self.source}: row {i} of split {self.split} has no class (label {labels[i]}, or none): a split without labels "
                "(ImageNet's test) cannot train or validate; choose another with ?split=NAME"
            )
        return labels

    def _make_keys(self, paths) -> list[str]:
        """``SPLIT/ROW``, plus ``/PATH`` where the image has one: stable names the fingerprint hashes."""
        names = [p for column, rows in paths for p in (column.to_pylist() if column is not None else [None] * rows)]
        return [f"{self.split}/{i:08d}/{p}" if p else f"{self.split}/{i:08d}" for i, p in enumerate(names)]

    def _set_classes(self, features: dict) -> None:
        found = int(self.labels.max()) + 1
        names = _class_names(features.get(self.label_column))
        if found > MAX_CLASSES or (names is not None and found > len(names)):
            i = int(np.argmax(self.labels))
            limit = (
                f"its ClassLabel has {len(names)} names"
                if names is not None and found <= MAX_CLASSES
                else f"classes are numbers below {MAX_CLASSES:,}"
            )
            raise UserError(
                f"{self.source}: row {i} has class {self.labels[i]}, but {limit}: fix the row's {self.label_column}"
            )
        self.classes = names or [str(c) for c in range(found)]

    # -- reading -----------------------------------------------------------------------------------

    def _image_fields(self, column):
        """(bytes, paths or None) of an image column: an Image feature's struct fields, or the column itself."""
        names = _struct_fields(column.type)
        if not names:
            return column, None
        return _field(column, "bytes"), (_field(column, "path") if "path" in names else None)

    def _part_images(self, p: int):
        """(bytes, paths) of part ``p``'s rows: an Arrow file's in place, a parquet row group's read (the last few kept)."""
        if not self.parquet:
            f = int(self._part_file[p])
            if f not in self._columns:
                self._columns[f] = self._image_fields(self._handle(f).column(self.image_column))
            return self._columns[f]
        key = (int(self._part_file[p]), int(self._part_group[p]))
        fields = self._groups.pop(key, None)
        if fields is None:
            import pyarrow as pa

            try:
                table = self._handle(key[0]).read_row_group(key[1], columns=[self.image_column])
            except (OSError, pa.ArrowException) as e:
                raise UserError(
                    f"{self.source}: cannot read row group {key[1]} of {self.files[key[0]]} ({e}): the dataset changed or is damaged"
                ) from None
            fields = self._image_fields(table.column(0))
        self._groups[key] = fields
        while len(self._groups) > GROUPS_KEPT:
            self._groups.popitem(last=False)
        return fields

    def _buffer(self, i: int):
        """Row ``i``'s encoded image as a pyarrow buffer (in place, for an Arrow file), or the file its path names."""
        import pyarrow as pa

        p = int(np.searchsorted(self._starts, i, "right")) - 1
        data, paths = self._part_images(p)
        j = i - int(self._starts[p])
        buffer = data[j].as_buffer()
        if buffer is not None:
            return buffer
        path = paths[j].as_py() if paths is not None else None
        if not path:
            raise UserError(f"{self._name(i)}: the row has no image (neither bytes nor a path); {BAD_ROW_FIX}")
        try:
            return pa.py_buffer(Path(path).read_bytes())
        except OSError as e:
            raise UserError(f"{self._name(i)}: cannot read its image file {path} ({e}); {BAD_ROW_FIX}") from None

    def _name(self, i: int) -> str:
        return f"{self.source}: row {self.keys[i]}"

    def encoded(self, ids) -> np.ndarray | None:
        """Parquet: the images of ``ids`` as bytes, read in row order (each row group once). Arrow: None, as each
        loader worker reads its rows in place."""
        if not self.parquet:
            return None
        ids = np.asarray(ids, np.int64)
        out = np.empty(len(ids), object)
        for k in np.argsort(ids, kind="stable"):
            out[k] = self._buffer(int(ids[k])).to_pybytes()
        return out

    def decode(self, i: int, data: bytes) -> torch.Tensor:
        try:
            return decode_image(data, self._name(i))
        except Exception as e:
            raise UserError(f"{self._name(i)}: cannot decode its image ({e}); {BAD_ROW_FIX}") from None

    def image(self, i: int) -> torch.Tensor:
        return self.decode(i, self._buffer(i).to_pybytes())

    def sizes(self) -> np.ndarray:
        # Every image's header (and its last bytes: a truncated image is refused now, before any work starts), read
        # once per version of the files: a parquet dataset's headers cost reading all of its row groups.
        if self._sizes is None:
            cache = index_cache_dir().parent / "hfds-sizes" / f"{self._files_digest()}.npy"
            try:
                sizes = np.load(cache)
                if sizes.shape == (len(self), 2):
                    self._sizes = sizes
            except (OSError, ValueError):
                pass
        if self._sizes is None:
            self._sizes = np.asarray([self._header(i) for i in range(len(self))], np.int64).reshape(-1, 2)
            try:  # a cache that cannot be written costs the next open a header pass
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, self._sizes)
                os.replace(tmp, cache)
            except OSError as e:
                log.debug("cannot cache the image sizes of %s in %s: %s", self.source, cache, e)
        return self._sizes

    def _files_digest(self) -> str:
        stats = []
        for path in self.files:
            st = os.stat(path)
            stats.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps([SIZES_VERSION, self.image_column, stats]).encode()).hexdigest()[:32]

    def _header(self, i: int) -> tuple[int, int]:
        """(height, width) of row ``i``'s image from its header; an image that does not end whole is decoded now."""
        import pyarrow as pa
        from PIL import Image

        buffer = self._buffer(i)
        try:
            with Image.open(pa.BufferReader(buffer)) as im:
                hw = header_size(im, self._name(i))
        except Exception as e:
            raise UserError(f"{self._name(i)}: cannot read its image ({e}); {BAD_ROW_FIX}") from None
        return hw

    def order_note(self) -> str | None:
        """One line when a parquet dataset's rows are in class order (its blocks follow the rows), else None."""
        same = class_order(self.labels) if self.sequential else None
        if same is None:
            return None
        return (
            f"{self.source}: the rows are in class order ({same:.0%} of neighbouring rows share a class): parquet row groups are read whole, "
            "so blocks follow the rows, and batches and mixing partners will mostly share a class; shuffle the rows when writing the files, "
            "or save the dataset with save_to_disk (Arrow files are read in any order)"
        )


def _struct_fields(kind) -> list[str]:
    """The field names of a struct type (an Image feature's ``bytes``, ``path``); [] for any other type."""
    import pyarrow as pa

    return [field.name for field in kind] if pa.types.is_struct(kind) else []


def _field(column, name: str):
    """A struct column's field as its own column, without copying."""
    import pyarrow.compute as pc

    return pc.struct_field(column, name)
