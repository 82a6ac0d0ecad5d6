"""The webdataset backend: a teacher's outputs as tar shards, one per (view, block) unit.

Layout, under ``STORE/teachers/<id>/``::

    arrays.json                      {"format": "wds", "num_views", "num_samples", "block",
                                      "arrays": {name: {"row_shape": [...], "dtype": "..."}}}
    shards/vVVVVVV-bBBBBBB.tar       one tar per unit: view V of samples B*block ..
    commits/vVVVVVV-bBBBBBB.json     the same commit records as the zarr backend

Shard b covers the same samples as block b of the plan (and of a dataset
sharded by ``--block``), so a streaming reader can pair them shard by shard.
Each tar holds one record, ``__key__`` = ``vVVVVVV-bBBBBBB``, with two members:

* ``<key>.npz``: every array of the unit, rows ``start .. start + rows``, as
  ``<name>.npy`` entries of a deflate-compressed zip (``numpy.savez_compressed``
  format, but with fixed timestamps so the same unit gives the same bytes).
  Dtypes are kept exactly; ``np.load`` reads it, and so does webdataset's
  default decoder.
* ``<key>.json``: ``{"view", "block", "start", "rows"}``; the rows are
  positions ``start .. start + rows - 1`` of the store's order, so their sample
  ids are ``order[start : start + rows]`` (the ``STORE/order`` array; for a
  store made from tar shards, a ``sequential`` source, the ids themselves).

Why npz and not the zarr backend's blosc: it decodes anywhere with nothing but
numpy, and it stores about as small (measured on teacher outputs: within a few
percent of blosc-zstd with bit-shuffle on dense float16 features, smaller on
sparse ReLU features), at the price of slower encoding (deflate). One packed
member per unit, never one per view: many tiny members are slow and large.

Streaming the committed shards with plain webdataset::

    import webdataset as wds
    from storage.wds import wds_urls
    for sample in wds.WebDataset(wds_urls(store, "t1"), shardshuffle=False).decode():
        arrays, meta = sample["npz"], sample["json"]  # {name: (rows, ...) array}, {"view", "block", "start", "rows"}

(webdataset opens local paths and http(s); for ``s3://`` URLs wrap each as
``f"pipe:aws s3 cp {url} -"``.)
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np

from .errors import UserError
from .location import Location
from .units import ArraySpec, CommittedUnits, as_location, register_backend

ARRAYS_FILE = "arrays.json"
# Fixed member metadata: the same unit always gives byte-identical tars.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def unit_key(view: int, block: int) -> str:
    return f"v{view:06d}-b{block:06d}"


def pack_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """``np.savez_compressed`` bytes, deterministic (no wall-clock timestamps in the zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, npy.getvalue())
    return buf.getvalue()


def pack_tar(key: str, members: dict[str, bytes]) -> bytes:
    """One webdataset record as a whole tar file, in memory, with deterministic headers."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
        writer.write({"__key__": key, **members})
    return buf.getvalue()


def read_record(data: bytes) -> dict[str, bytes]:
    """The members of a one-record tar, by extension (``npz``, ``json``)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                out[member.name.split(".", 1)[1]] = tar.extractfile(member).read()
    return out


@register_backend
class TarUnits(CommittedUnits):
    """A teacher's [V, N, ...] arrays as one webdataset tar per (view, block) unit."""

    format = "wds"

    def __init__(self, location, block: int):
        super().__init__(location, block)
        self.meta = (self.location / ARRAYS_FILE).read_json()
        self.specs = {name: ArraySpec(tuple(s["row_shape"]), s["dtype"]) for name, s in self.meta["arrays"].items()}
        self.shards = self.location / "shards"

    @classmethod
    def create(cls, location, specs: dict[str, ArraySpec], num_views: int, num_samples: int, block: int):
        location = as_location(location)
        meta_loc = location / ARRAYS_FILE
        meta = meta_loc.read_json() if meta_loc.exists() else {"format": cls.format, "arrays": {}, "num_views": 0}
        # Like the zarr backend: arrays that exist are kept as they are, new ones are added.
        arrays = {name: {"row_shape": list(s.row_shape), "dtype": s.dtype} for name, s in specs.items()}
        new = {
            **meta,
            "arrays": {**arrays, **meta["arrays"]},
            "num_views": max(meta["num_views"], num_views),
            "num_samples": num_samples,
            "block": block,
        }
        if new != meta:
            meta_loc.write_json(new)
        return cls(location, block)

    @property
    def names(self) -> list[str]:
        return sorted(self.specs)

    def _shape(self, name: str) -> tuple[int, ...]:
        return (self.meta["num_views"], self.meta["num_samples"], *self.specs[name].row_shape)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._shape(name) for name in self.specs}

    def describe(self, units=None) -> dict[str, dict]:
        """Per array: dtype, full shape, decoded bytes and bytes as stored.

        All arrays of a unit share one tar, so the tars' total size (one listing)
        is split between arrays in the proportions of one sampled unit's members.
        """
        sizes = {e["name"]: e["size"] for e in self._listing()}
        if units is not None:
            keep = {self.tar(v, b).path for v, b in units}
            sizes = {name: size for name, size in sizes.items() if name.rstrip("/") in keep}
        decoded = {
            name: int(np.prod(self._shape(name))) * np.dtype(spec.dtype).itemsize for name, spec in self.specs.items()
        }
        weight = decoded  # until a unit is read: in proportion to the decoded sizes
        if sizes:
            try:
                # read_bytes refuses a pipe named .tar
                sample = self.shards / next(iter(sizes)).rstrip("/").rsplit("/", 1)[-1]
                with zipfile.ZipFile(io.BytesIO(read_record(sample.read_bytes())["npz"])) as z:
                    weight = {i.filename.removesuffix(".npy"): i.compress_size for i in z.infolist()}
            except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile):
                pass  # a damaged tar is verify's business, not describe's
        total, norm = sum(sizes.values()), max(sum(weight.get(n, 0) for n in self.specs), 1)
        return {
            name: {
                "dtype": self.specs[name].dtype,
                "shape": list(self._shape(name)),
                "nbytes": decoded[name],
                "stored_bytes": round(total * weight.get(name, 0) / norm),
            }
            for name in self.names
        }

    def _listing(self) -> list[dict]:
        self.shards.fs.invalidate_cache(self.shards.path)
        try:
            entries = self.shards.fs.ls(self.shards.path, detail=True)
        except FileNotFoundError:
            return []
        return sorted((e for e in entries if e["name"].endswith(".tar")), key=lambda e: e["name"])

    def resize_views(self, num_views: int) -> None:
        """Grow the view axis: only the count in arrays.json changes (one tar per unit)."""
        if num_views > self.meta["num_views"]:
            self.meta["num_views"] = num_views
            (self.location / ARRAYS_FILE).write_json(self.meta)

    def tar(self, view: int, block: int) -> Location:
        return self.shards / f"{unit_key(view, block)}.tar"

    def urls(self, views: int | None = None) -> list[str]:
        """URLs of the committed tars, view-major, for streaming readers; ``views`` limits the view count."""
        units = sorted(u for u in self.committed() if views is None or u[0] < views)
        return [self.tar(v, b).url for v, b in units]

    def _has_data(self, view, block, name) -> bool:
        return self.tar(view, block).exists()

    def _write_data(self, view, block, data):
        start = block * self.block
        out = {}
        for name, rows_data in data.items():
            spec = self.specs[name]
            a = np.ascontiguousarray(np.asarray(rows_data, dtype=spec.dtype))
            if a.shape[1:] != spec.row_shape:
                raise ValueError(f"{name}: rows of shape {a.shape[1:]}, the store holds {spec.row_shape}")
            out[name] = a
        lengths = sorted({len(a) for a in out.values()})
        n = lengths[0]
        if len(lengths) != 1 or not 0 < n <= min(self.block, self.meta["num_samples"] - start):
            raise ValueError(f"unit ({view}, {block}): arrays of {lengths} rows do not fit block {block}")
        meta = json.dumps({"view": view, "block": block, "start": start, "rows": n}, sort_keys=True).encode()
        # Built whole in memory, then one atomic write: a reader sees the old tar or the new one.
        self.tar(view, block).write_bytes(pack_tar(unit_key(view, block), {"npz": pack_npz(out), "json": meta}))
        return out

    def _read_data(self, view, block, names, start, stop):
        lo, hi = start - block * self.block, stop - block * self.block
        try:
            data = self.tar(view, block).read_bytes()  # one GET
        except FileNotFoundError:
            # As zarr does for a shard never written: the fill value.
            rows = min(stop, self.meta["num_samples"]) - start
            return {n: np.zeros((rows, *self.specs[n].row_shape), self.specs[n].dtype) for n in names}
        with np.load(io.BytesIO(read_record(data)["npz"]), allow_pickle=False) as z:
            # Only the asked-for members are inflated.
            return {n: z[n][lo:hi] for n in names}


def wds_urls(store, teacher_id: str) -> list[str]:
    """The committed tars of a wds-format teacher, view-major: the shard list for ``webdataset.WebDataset``."""
    group = store.teacher(teacher_id)
    if not isinstance(group, TarUnits):
        raise UserError(
            f"teacher '{teacher_id}' in {store.path} is stored as {group.format}, not wds: extract it with --format wds"
        )
    return group.urls(store.teacher_info(teacher_id).views)  # views beyond the teacher's count are not its own
