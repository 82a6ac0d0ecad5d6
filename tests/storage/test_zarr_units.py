"""Reading a unit's shards directly (``ShardLayout``) gives what zarr's own read gives, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from zarr.codecs import ZstdCodec

from storage import ArraySpec, Store
from storage import zarr_units
from storage.units import DamagedUnit
from storage.zarr_units import ShardLayout, UnitArrays


def _zarr_read(group: UnitArrays, view: int, block: int, name: str) -> np.ndarray:
    """The old path: zarr's indexing of the unit's rows."""
    start = block * group.block
    return group.array(name)[view, start : start + group.record(view, block)["rows"]]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _groups(store: Store) -> dict[str, UnitArrays]:
    return {"plan": store.plan, **{tid: store.teacher(tid) for tid in store.teacher_ids()}}


@pytest.mark.parametrize("fixture", ["base_store", "two_teacher_store"])
def test_direct_shard_reads_equal_zarr_reads_bit_for_bit(fixture, request):
    store = Store(request.getfixturevalue(fixture))
    for gid, group in _groups(store).items():
        assert all(ShardLayout.of(group.array(n)) is not None for n in group.names), gid  # the direct path is taken
        for view, block in sorted(group.committed()):
            direct = group.read_unit(view, block, verify=True)
            for name in group.names:
                assert _same(direct[name], _zarr_read(group, view, block, name)), (gid, view, block, name)


def _small_chunks_group(tmp_path, monkeypatch) -> UnitArrays:
    # Chunks of 4 rows (16 per shard) so that shards hold several inner chunks, some of them all zeros.
    monkeypatch.setattr(zarr_units, "CHUNK_BYTES", 4 * 6 * 2)
    specs = {"x": ArraySpec((6,), "float16"), "i": ArraySpec((6,), "int8"), "s": ArraySpec((), "float32")}
    return UnitArrays.create(tmp_path / "g", specs, num_views=2, num_samples=40, block=16)


def test_several_inner_chunks_empty_chunks_and_missing_shards_read_as_zarr_reads_them(tmp_path, monkeypatch):
    group = _small_chunks_group(tmp_path, monkeypatch)
    rng = np.random.default_rng(0)
    for view in range(2):
        for block, rows in enumerate((16, 16, 8)):  # 40 samples: the last block is short
            x = rng.standard_normal((rows, 6)).astype(np.float16)
            x[4:8] = 0  # an inner chunk equal to the fill value: zarr does not store it
            zeros = view == 1 and block == 0  # a unit of zeros: zarr stores no shard at all
            data = {
                "x": x,
                "i": rng.integers(-127, 128, (rows, 6), dtype=np.int8),
                "s": rng.random(rows, dtype=np.float32),
            }
            group.write_unit(view, block, {k: np.zeros_like(v) for k, v in data.items()} if zeros else data)
    assert not group._shard(1, 0, "x").exists()
    assert ShardLayout.of(group.array("x")).chunk_rows == 4
    for view, block in sorted(group.committed()):
        direct = group.read_unit(view, block, verify=True)
        for name in group.names:
            assert _same(direct[name], _zarr_read(group, view, block, name)), (view, block, name)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "index checksum"])
def test_a_damaged_shard_is_a_damaged_unit(tmp_path, monkeypatch, damage):
    group = _small_chunks_group(tmp_path, monkeypatch)
    rng = np.random.default_rng(1)
    group.write_unit(
        0,
        0,
        {
            "x": rng.standard_normal((16, 6)).astype(np.float16),
            "i": np.ones((16, 6), np.int8),
            "s": np.ones(16, np.float32),
        },
    )
    path = group._shard(0, 0, "x").path
    data = bytearray(open(path, "rb").read())
    if damage == "flip a byte":
        data[40] ^= 0xFF  # inside the first chunk's compressed bytes
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0x01  # inside the index: its CRC32C no longer matches
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedUnit, match=r"unit \(view 0, block 0\)"):
        group.read_unit(0, 0, verify=True)


def test_an_array_of_another_layout_is_read_by_zarr(tmp_path, monkeypatch):
    group = _small_chunks_group(tmp_path, monkeypatch)
    # Written by another tool: plain zstd, no blosc. The direct path declines it; zarr reads it as before.
    other = group.group.create_array(
        "z", shape=(2, 40), dtype="int32", chunks=(1, 16), shards=(1, 16), compressors=[ZstdCodec(level=3)]
    )
    other[:] = np.arange(80, dtype=np.int32).reshape(2, 40)
    assert ShardLayout.of(other) is None
    assert _same(group._read_data(1, 2, ["z"], 32, 40)["z"], np.arange(72, 80, dtype=np.int32))
