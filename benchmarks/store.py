"""What the store costs: bytes per view, codec choice, epoch reads, and writing beside the teacher.

One run, on one machine, side by side (medians of ``--repeats``; ratios are what count, since
machines here are shared and noisy):

  bytes   a product store written with ``Store``/``UnitArrays`` and ``teacher_rows.encode``: the default
          plan (crop, flip, fingerprint) and top-10 float16 logits with their log-sum-exp and
          true-class logit, plus pooled features (float16, and int8 where ``cache`` offers it).
          Two sources, labelled: (syn) synthetic outputs with the statistics of a strong
          ImageNet-1k teacher (top-1 probability median ~0.8, top-10 mass ~0.94, 86% top-1,
          confusions between similar classes; features Gaussian with a spread of per-dimension
          scales; ImageNet-like image sizes for the crop boxes; labels in random order, the
          worst case for compression), and (real) a random-init timm teacher run by ``extract``.
  codecs  every stored array re-encoded with each candidate codec in the product's shard layout.
  read    one epoch as ``stages.training.distill.train`` reads it (whole units, window shuffle, re-batch,
          ``teacher_rows.decode``), without rendering: bytes fetched (``/proc/self/io`` rchar) over the
          stored bytes of the rows it used; views/s of that reader vs. the same arrays read from
          numpy memmaps through the same code (interleaved rounds; the ratio, target >= 0.5), vs. a
          small student's training step.
  write   the teacher forward alone on pre-rendered views vs. the same forward plus the store
          (encode, write, commit: ``stages.extract``'s own commit code); and ``extract()`` end to end
          vs. rendering + forward with no store.

    .venv/bin/python benchmarks/store.py            # about 4-5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/store.py --quick    # about 1 minute
    .venv/bin/python benchmarks/store.py --read-only --samples 16384 --views 4   # the read section alone, seconds
"""

from __future__ import annotations

import argparse
import inspect
from concurrent.futures import ThreadPoolExecutor
import os
import platform
import statistics
import tempfile
import time
import types
import warnings
from pathlib import Path

import numcodecs.blosc
import numpy as np
import timm
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

# benchmarks/fidelity.py (run from the repository root as a script)
from fidelity import cosine_fidelity, gradient_cosine, old_tail_clamped
from stages.cache import teacher_rows
from stages.cache import topk
from stages.data.datasets import open_dataset
from stages.model_outputs import student_forward
from stages.training.student import build_student
from stages.teachers.teacher_sources import CachedTeacher
from stages.teachers.extract import TeacherRunner, _commit_unit, extract, open_teacher, teacher_info
from stages.cache.store_setup import FINGERPRINT, library_versions, open_store, stored_plan
from stages.methods.losses import kd_loss
from stages.data.image_dataset import ImageDataset
from stages.data.replay import StoredViews, ViewRenderer, epoch_units, even_batches, render_batches, with_partner_params
from stages.training.loader import ReplayLoader
from stages.teachers.teachers import build_teacher
from stages.data.views import ViewPlan, ViewRecipe, normalize
from storage import DatasetRecord, PlanRecord, Store, TeacherRecord
from storage import zarr_units
from storage.codecs import compressor

LOGIT_ARRAYS = topk.ARRAYS  # top-k log-probabilities and classes, log-sum-exp, tail mass and mean, target
PLAN_ARRAYS = ("crop", "flip", "fingerprint")  # the default recipe's fields (plan.fields) + fingerprint
READ_ROUNDS = 5  # read rounds per --repeats: one epoch of the synthetic store reads in well under a second


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, 3 repeats: about 1 minute")
    p.add_argument(
        "--fidelity-only", action="store_true", help="only the top-k fidelity section (synthetic and digits teachers)"
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="only the read section: the synthetic store read by the trainer's code vs memmaps",
    )
    p.add_argument(
        "--digits-epochs", type=int, default=10, help="epochs of the digits teacher fitted for the fidelity section"
    )
    p.add_argument("--samples", type=int, default=None, help="synthetic store samples (default 8192, quick 4096)")
    p.add_argument("--views", type=int, default=2, help="synthetic store views")
    p.add_argument("--block", type=int, default=1024, help="samples per unit (the product default)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dim", type=int, default=768, help="synthetic feature dimension")
    p.add_argument("--teacher", default="resnet18", help="real (random-init) timm teacher for the write test")
    p.add_argument("--teacher-size", type=int, default=32)
    p.add_argument(
        "--write-samples", type=int, default=None, help="samples extracted in the write test (default 3072, quick 2048)"
    )
    p.add_argument(
        "--write-block",
        type=int,
        default=None,
        help="unit size in the write test (default --block); keep several units so writes can overlap",
    )
    p.add_argument("--repeats", type=int, default=None, help="default 5, quick 3")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (see benchmarks/distill_cost.py)")
    a = p.parse_args()
    a.samples = a.samples or (4096 if a.quick else 8192)
    a.write_samples = a.write_samples or (2048 if a.quick else 3072)
    a.write_block = a.write_block or a.block
    a.repeats = a.repeats or (3 if a.quick else 5)
    return a


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- synthetic teacher outputs -----------------------------------------------------------------


class SyntheticTeacher:
    """Outputs with a strong ImageNet teacher's statistics, drawn per (view, sample).

    Logits: 16 x cosine(sample embedding, class prototype) + N(0, 1), with the sample's embedding
    its class prototype plus noise in 32 dimensions, so confusions fall on nearby classes.
    Features: class mean + noise, per-dimension scales log-normal (sigma 0.7) around a shifted mean.
    """

    def __init__(self, classes: int, dim: int, seed: int = 0, scale: float = 16.0):
        rng = np.random.default_rng(seed)
        self.logit_scale = scale  # 16: top-1 probability median ~0.8; 20 ('confident'): ~0.93
        self.protos = rng.standard_normal((classes, 32))
        self.protos /= np.linalg.norm(self.protos, axis=1, keepdims=True)
        self.class_feat = rng.standard_normal((classes, dim)) * 0.5
        self.scale = np.exp(0.7 * rng.standard_normal(dim))
        self.shift = rng.standard_normal(dim) * 0.3
        self.seed = seed
        # What teacher_rows.output_info reads from a teacher.
        self.spec = types.SimpleNamespace(name="synthetic")
        self.num_classes, self.feature_dim = classes, dim
        self.default_outputs = self.outputs = ("logits", "features")

    def __call__(self, view: int, ids: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, view, int(ids[0])])
        f = self.protos[labels] + 0.8 * rng.standard_normal((len(ids), 32)) / np.sqrt(32)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        logits = self.logit_scale * f @ self.protos.T + rng.standard_normal((len(ids), len(self.protos)))
        feats = (self.class_feat[labels] + rng.standard_normal((len(ids), len(self.scale)))) * self.scale + self.shift
        return {"logits": torch.from_numpy(logits).float(), "features": torch.from_numpy(feats).float()}


def imagenet_like_sizes(n: int, rng) -> np.ndarray:
    """(H, W) like ImageNet's train set: mostly 375x500 landscape, some portrait and odd sizes."""
    common = np.array([(375, 500), (500, 375), (333, 500), (500, 333), (500, 500)])
    sizes = common[rng.choice(len(common), n, p=[0.6, 0.15, 0.1, 0.05, 0.1])]
    odd = rng.random(n) < 0.1
    sizes[odd] = rng.integers(120, 1200, (odd.sum(), 2))
    return sizes


def has_int8() -> bool:
    return "feature_dtype" in inspect.signature(teacher_rows.output_info).parameters and "int8" in getattr(
        teacher_rows, "FEATURE_DTYPES", ()
    )


def write_synthetic_store(path, args) -> tuple[Store, dict]:
    """A product store of synthetic outputs: teacher 'syn' (top-10 + float16 features), 'syn-int8' (int8 features)."""
    rng = np.random.default_rng(1)
    N, V, B = args.samples, args.views, args.block
    plan = ViewPlan(ViewRecipe(), seed=0)
    labels = rng.integers(0, args.classes, N)  # random order: no help from class-sorted ids
    sizes = imagenet_like_sizes(N, rng)
    dataset = DatasetRecord(
        source="synthetic",
        fingerprint="synthetic",
        num_samples=N,
        num_classes=args.classes,
        classes=tuple(map(str, range(args.classes))),
    )
    store = Store.create(
        path,
        dataset=dataset,
        plan=PlanRecord(**plan.describe(), size=224),
        versions=library_versions(),
        num_views=V,
        block=B,
        plan_specs={**plan.fields, "fingerprint": FINGERPRINT},
    )
    teacher = SyntheticTeacher(args.classes, args.dim)
    variants = {"syn": {}}
    if has_int8():  # the same features again, stored as int8 with a per-vector scale
        variants["syn-int8"] = dict(feature_dtype="int8", outputs=("features",))
    groups = {}
    for tid, kw in variants.items():
        info = TeacherRecord(
            format="zarr",
            precision="fp32",
            name="synthetic",
            timm_name="synthetic",
            weights="synthetic",
            input_size=224,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            versions=library_versions(),
            views=V,
            **teacher_rows.output_info(teacher, logits="topk", k=10, dtype="float16", **kw),
        )
        groups[tid] = (store.create_teacher(tid, info, teacher_rows.array_specs(info)), info)
    fidelity = {}
    for v in range(V):
        for b in range(store.num_blocks):
            ids = store.block_ids(b)
            params = plan.draw(v, ids, sizes[ids])
            fp = rng.integers(0, 2**32, len(ids), dtype=np.uint32)  # a CRC32 of distinct images: uniform
            store.plan.write_unit(v, b, {**params, "fingerprint": fp})
            out = teacher(v, ids, labels[ids])
            for tid, (group, info) in groups.items():
                rows = teacher_rows.encode(out, torch.from_numpy(labels[ids]), info)
                group.write_unit(v, b, rows)
                if v == 0 and b == 0:
                    dec = teacher_rows.decode(rows, info, ("features",))["features"]
                    fidelity[tid] = cosine_fidelity(out["features"], dec)
    p = torch.softmax(teacher(0, np.arange(2048), labels[:2048])["logits"], 1).sort(1, descending=True).values
    stats = {
        "top1": float(p[:, 0].median()),
        "top10": float(p[:, :10].sum(1).median()),
        "acc": float((teacher(0, np.arange(2048), labels[:2048])["logits"].argmax(1).numpy() == labels[:2048]).mean()),
    }
    return store, {"labels": labels, "fidelity": fidelity, "stats": stats}


# -- bytes -------------------------------------------------------------------------------------


def stored_per_view(store: Store, group_names: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """(raw, stored) bytes per view of each array; ``group_names``: {'plan' or teacher id: names}."""
    views = store.num_views * store.num_samples
    out = {}
    for gid, names in group_names.items():
        group = store.plan if gid == "plan" else store.teacher(gid)
        desc = group.describe()
        for n in names:
            if n in desc:
                out[f"{gid}/{n}"] = (desc[n]["nbytes"] / views, desc[n]["stored_bytes"] / views)
    return out


def shard_layout_bytes(data: np.ndarray, codec, block: int, chunk_rows: int) -> float:
    """Stored bytes per row of ``data`` [V, N, ...] in the product's shard layout with ``codec``."""
    st = MemoryStore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.create_array(
            st,
            shape=data.shape,
            dtype=data.dtype,
            chunks=(1, chunk_rows, *data.shape[2:]),
            shards=(1, block, *data.shape[2:]),
            compressors=[codec],
            fill_value=0,
        )
        arr[:] = data
    size = sum(len(b.to_bytes()) for k, b in st._store_dict.items() if not k.endswith("zarr.json"))
    return size / (data.shape[0] * data.shape[1])


def encode_rate(data: np.ndarray, codec, chunk_rows: int, repeats: int = 5) -> float:
    """Rows/s one thread encodes, calling the codec's C library directly (zarr's async overhead left out)."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    if isinstance(codec, BloscCodec):
        shuffle = {
            "noshuffle": numcodecs.Blosc.NOSHUFFLE,
            "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
        }
        nc = numcodecs.Blosc(codec.cname.value, codec.clevel, shuffle[codec.shuffle.value])
    else:
        nc = numcodecs.Zstd(codec.level)
    rows = data.reshape(-1, *data.shape[2:])
    chunks = [np.ascontiguousarray(rows[i : i + chunk_rows]) for i in range(0, len(rows), chunk_rows)]
    t = time.perf_counter()
    [nc.encode(c) for c in chunks]
    once = time.perf_counter() - t
    return len(rows) / (once if once > 0.2 else median_time(lambda: [nc.encode(c) for c in chunks], repeats))


def candidates(dtype) -> dict[str, object]:
    t = np.dtype(dtype).itemsize
    return {
        "blosc-zstd5-bit": BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=t),
        "blosc-zstd5-byte": BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=t),
        "blosc-zstd5-none": BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle", typesize=t),
        "blosc-zstd3-byte": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=t),
        "blosc-zstd9-byte": BloscCodec(cname="zstd", clevel=9, shuffle="shuffle", typesize=t),
        "blosc-lz4-bit": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=t),
        "blosc-lz4-byte": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=t),
        "zstd3": ZstdCodec(level=3),
    }


def codec_table(arrays: dict[str, np.ndarray], block: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per array and codec: (bytes per row, encode rows/s); 'product' is storage.codecs' choice."""
    table = {}
    for name, data in arrays.items():
        chunk = zarr_units.inner_chunk_rows(block, data.shape[2:], data.dtype)  # what the store uses
        row = {
            c: (shard_layout_bytes(data, codec, block, chunk), encode_rate(data, codec, chunk))
            for c, codec in candidates(data.dtype).items()
        }
        row["product"] = (
            shard_layout_bytes(data, compressor(data.dtype), block, chunk),
            encode_rate(data, compressor(data.dtype), chunk),
        )
        small = min(chunk, 256)  # the alternative: 256-row chunks, cheaper for random-row reads
        row["product 256-row chunks"] = (
            shard_layout_bytes(data, compressor(data.dtype), block, small),
            encode_rate(data, compressor(data.dtype), small),
        )
        table[name] = row
    return table


# -- reading -----------------------------------------------------------------------------------


class MemmapSource:
    """The same arrays as numpy memmaps [V, N, ...], with the reader interface of StoredViews (views) or CachedTeacher (rows)."""

    size = None  # a cached source: nothing to render for it

    def __init__(
        self, root: Path, arrays: dict[str, np.ndarray], store: Store, prefix: str, info: TeacherRecord | None = None
    ):
        root.mkdir(parents=True, exist_ok=True)
        self.maps = {}
        for name, data in arrays.items():
            np.save(root / f"{name}.npy", data)
            self.maps[name] = np.load(root / f"{name}.npy", mmap_mode="r")
        self.ids, self.num_blocks, self.block = store.block_ids, store.num_blocks, store.block
        self.num_views = len(next(iter(self.maps.values())))
        self.prefix, self.info, self.needs = prefix, info, ("logits",)

    def params(self, view, block):
        s = block * self.block
        return {k: np.array(m[view, s : s + self.block]) for k, m in self.maps.items()}

    def unit_rows(self, view, block, rows):
        s = block * self.block
        return {self.prefix + k: np.array(m[view, s : s + rows]) for k, m in self.maps.items()}

    def outputs(self, batch, views, temperature=1.0, needs=None):
        n = len(self.prefix)
        return teacher_rows.decode(
            {k[n:]: v for k, v in batch.items() if k.startswith(self.prefix)},
            self.info,
            needs or self.needs,
            temperature,
        )


class Labels(ImageDataset):
    """A dataset of labels only: the reads need ids and labels, never an image (nothing is rendered)."""

    def __init__(self, labels: np.ndarray, num_classes: int):
        self.labels, self.keys, self.classes, self.source = (
            labels,
            [str(i) for i in range(len(labels))],
            [str(c) for c in range(num_classes)],
            "labels",
        )


def read_loader(plan: ViewPlan, views, teacher, labels: np.ndarray, num_classes: int, batch_size: int) -> ReplayLoader:
    """The product's loader over ``views`` and ``teacher`` (a store's or memmaps): its reads are what is measured."""
    return ReplayLoader(
        Labels(labels, num_classes), plan, views, batch_size, teachers={"t": teacher}, size=224, verify="none"
    )


def read_epoch(loader: ReplayLoader, epoch: int) -> int:
    """One epoch's reads as training does them (``ReplayLoader.row_batches``: whole units, shuffle, re-batch, teacher rows
    decoded), minus rendering and the student: views delivered."""
    loader.set_epoch(epoch)
    n = 0
    for batch in loader.row_batches():
        loader.teacher_outputs(batch)  # (B, C) float32 logits, ready for the loss
        n += len(batch["id"])
    return n


def read_section(report: "Report", tmp: Path, store: Store, labels: np.ndarray, args) -> float:
    """One epoch's reads from the store against the same arrays in numpy memmaps, interleaved; the store's views/s."""
    torch.set_num_threads(args.threads)  # the sections before (`pipeline train` for the digits teacher) change it
    ct = CachedTeacher(store, "syn", ("logits",))
    views = StoredViews(store, stored_plan(store), args.views)
    loader = read_loader(views.plan, views, ct, labels, args.classes, args.batch_size)
    read_epoch(loader, 0)  # warm-up (page cache, imports)
    before = rchar()
    used_rows = read_epoch(loader, 1)
    fetched = rchar() - before
    units = epoch_units(1, args.views, store.num_blocks, 0)
    shard = sum(shard_bytes(store.plan, views.names, v, b) + shard_bytes(ct.group, ct.names, v, b) for v, b in units)
    used = shard * used_rows / args.samples  # drop_last may leave a few rows unused
    report.add(
        "read amplification: fetched / used (one epoch)",
        f"{fetched / used:.3f}x",
        "<= 1.1x",
        fetched / used <= 1.1,
        f"{fetched / 1e6:.3f} MB fetched (rchar) for {used / 1e6:.3f} MB of shards used, {len(units)} units",
    )
    mm = tmp / "memmap"
    mviews = MemmapSource(mm / "plan", {n: store.plan.array(n)[:] for n in views.names}, store, "")
    mteacher = MemmapSource(mm / "t", {n: ct.group.array(n)[:] for n in ct.names}, store, "t:", ct.info)
    loaders = {
        "zarr": loader,
        "memmap": read_loader(views.plan, mviews, mteacher, labels, args.classes, args.batch_size),
    }
    rate = {"zarr": [], "memmap": []}
    # An epoch takes tens of milliseconds: many rounds, each reading the same epoch both ways one after the other,
    # so that a burst of load on a shared machine hits both alike.
    for e in range(READ_ROUNDS * args.repeats):
        for kind, reader in loaders.items():
            t = time.perf_counter()
            n = read_epoch(reader, e)
            rate[kind].append(n / (time.perf_counter() - t))
    r_zarr, r_mm = statistics.median(rate["zarr"]), statistics.median(rate["memmap"])
    per_round = statistics.median(z / m for z, m in zip(rate["zarr"], rate["memmap"]))
    threads = f"torch threads {torch.get_num_threads()}, blosc {'threads ' + str(numcodecs.blosc.get_nthreads()) if numcodecs.blosc.use_threads else '1 thread'}"
    report.add(
        "reader views/s (zarr store, incl. top-k decode)",
        f"{r_zarr:,.0f}",
        note="whole units, shuffle, re-batch, logits_from_topk",
    )
    report.add(
        "reader views/s (same arrays, numpy memmap)",
        f"{r_mm:,.0f}",
        note=f"the same code on np.load(mmap_mode='r'); {threads}",
    )
    report.add(
        "reader / memmap (medians)",
        f"{r_zarr / r_mm:.2f}x",
        ">= 0.5x",
        r_zarr / r_mm >= 0.5,
        f"median of per-round ratios {per_round:.2f}; {len(rate['zarr'])} interleaved rounds, {len(units)} units an epoch",
    )
    return r_zarr


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def shard_bytes(group, names, v, b) -> int:
    """File bytes of the shards of unit (v, b) (local store): what reading the unit whole must fetch."""
    total = 0
    for n in names:
        arr = group.array(n)
        key = arr.metadata.encode_chunk_key((v, b) + (0,) * (arr.ndim - 2))
        total += os.path.getsize(os.path.join(group.location.path, n, key))
    return total


def student_rate(name, kwargs, size, classes, batch_size, repeats) -> float:
    """Training views/s of a student (forward, KD loss on decoded logits, backward, AdamW step), pre-rendered input."""
    model = build_student(name, classes, 0, **kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = normalize(
        torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8),
        model.pretrained_cfg["mean"],
        model.pretrained_cfg["std"],
    )
    t = torch.randn(batch_size, classes)

    def step():
        loss = kd_loss(student_forward(model, x, ())["logits"], t, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    return batch_size / median_time(step, repeats)


# -- report ------------------------------------------------------------------------------------


# -- top-k fidelity: the rebuild against the full logits ------------------------------------------


def train_digits_teacher(root: Path, epochs: int) -> tuple[object, object, torch.Tensor, torch.Tensor]:
    """A teacher fitted by ``pipeline train`` on digits, and its full float32 logits over one stored view of every image.

    Returns (dataset, teacher, logits (N, C), target classes (N,)), read back from a
    ``--logits full --dtype float32`` store made by ``extract``, block by block.
    """
    from pipeline.cli import main as pipeline_main

    rc = pipeline_main(
        [
            "--quiet",
            "train",
            "--data",
            "digits",
            "--model",
            "resnet10t",
            "--epochs",
            str(epochs),
            "--batch-size",
            "64",
            "--lr",
            "0.003",
            "--size",
            "32",
            "--out",
            str(root / "teacher"),
        ]
    )
    if rc:
        raise SystemExit(f"pipeline train failed ({rc})")
    data = open_dataset("digits")
    teacher = build_teacher("resnet10t", weights=str(root / "teacher" / "model.safetensors"), input_size=32)
    info = teacher_info(teacher, teacher_rows.output_info(teacher, logits="full", dtype="float32"))
    store = open_store(root / "store", data, ViewPlan(ViewRecipe(), seed=0), views=1, block=256, size=32)
    extract(store, data, TeacherRunner(teacher, info), "digits", views=1, batch_size=64)
    source = StoredViews(store, stored_plan(store), 1)
    group = store.teacher("digits")
    logits, target = [], []
    for b in range(store.num_blocks):
        ids = source.ids(b)
        logits.append(torch.from_numpy(group.read_unit(0, b, ["logits"], rows=len(ids))["logits"]))
        target.append(torch.from_numpy(data.labels[ids]))
    return data, teacher, torch.cat(logits), torch.cat(target)


def fidelity_rows(logits: torch.Tensor, target: torch.Tensor, k: int, seed: int = 0) -> dict:
    """What a top-``k`` float16 store keeps of ``logits`` (B, C): clamped tails (before and now), KL, gradient cosines."""
    from stages.cache import topk
    from stages.methods.losses import dist_loss, dkd_loss

    C = logits.shape[1]
    tail = 1.0 - torch.softmax(logits.double(), 1).topk(k, 1).values.sum(1)  # (B,) the true mass outside the top k
    real = tail > 1e-4
    stored = topk.TopK.of(logits, k, target).rows("float16", "int16")
    back = topk.TopK.from_rows(stored)
    rebuilt = {T: back.logits(C, T) for T in (1.0, 4.0)}
    p = torch.softmax(rebuilt[1.0].double(), 1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, back.topk_index, True)
    mass = p.masked_fill(kept, 0.0).sum(1)  # the rebuilt tail (the target's share included)
    g = torch.Generator().manual_seed(seed)
    students = {
        "untrained": torch.randn(logits.shape, generator=g),
        "halfway": 0.5 * logits + torch.randn(logits.shape, generator=g),
    }
    losses = {
        "KD T=1": lambda s, t: kd_loss(s, t, 1.0),
        "KD T=4": lambda s, t: kd_loss(s, t, 4.0),
        "DKD T=1 b=2": lambda s, t: dkd_loss(s, t, target, 1.0, 2.0, 1.0),
        "DIST tau=1": lambda s, t: dist_loss(s, t, 1.0, 1.0, 1.0),
    }
    cosines = {}
    for name, loss in losses.items():
        T = 4.0 if "T=4" in name else 1.0
        cosines[name] = {who: gradient_cosine(loss, s, logits, rebuilt[T]) for who, s in students.items()}
        if T != 1.0:  # the same loss with the tail left uniform at T = 1's mass: what the temperature-aware tail buys
            cosines[name + " (T=1 tail)"] = {
                who: gradient_cosine(loss, s, logits, rebuilt[1.0]) for who, s in students.items()
            }
    return {
        "rows": len(logits),
        "k": k,
        "classes": C,
        "top1": float(torch.softmax(logits.double(), 1).max(1).values.median()),
        "tail_median": float(tail.median()),
        "clamped_old": float(old_tail_clamped(logits, k).double().mean()),
        "clamped_old_real": float(old_tail_clamped(logits, k)[real].double().mean()) if real.any() else float("nan"),
        "clamped_now": float(((mass <= 0) | (mass < 0.5 * tail))[real].double().mean()) if real.any() else float("nan"),
        "tail_rel_err": float(((mass - tail).abs() / tail)[real].max()) if real.any() else float("nan"),
        "kl": {T: float(topk.kl(logits, rebuilt[T], T).mean()) for T in rebuilt},
        "kl_uniform_t4": float(topk.kl(logits, rebuilt[1.0], 4.0).mean()),
        "kl_estimate": {T: float(back.tail_kl(C, T).mean()) for T in rebuilt},
        "cosines": cosines,
    }


def fidelity_section(report: "Report", tmp: Path, args) -> None:
    """Top-k fidelity on the synthetic ImageNet-like teachers (1,000 classes, top-10) and a digits teacher (10 classes, top-3 and top-5)."""
    t0 = time.perf_counter()
    n = 2048 if args.quick else 4096
    labels = np.random.default_rng(5).integers(0, args.classes, n)
    cases = {}
    for name, scale in (("syn", 16.0), ("syn-confident", 20.0)):
        logits = SyntheticTeacher(args.classes, 8, seed=0, scale=scale)(0, np.arange(n), labels)["logits"]
        cases[f"{name} top-10"] = fidelity_rows(logits, torch.from_numpy(labels), 10)
    _, _, logits, target = train_digits_teacher(tmp / "digits", args.digits_epochs)
    for k in (3, 5):  # of 10 classes: the even tail is 7 or 5 classes, each a large share of DKD's non-target term
        cases[f"digits top-{k}"] = fidelity_rows(logits, target, k)
    print(
        f"\ntop-k fidelity, float16 store (rebuilt vs full logits; {time.perf_counter() - t0:.1f} s; digits teacher: resnet10t "
        f"fitted by `pipeline train` for {args.digits_epochs} epochs, one stored view of each of its images):"
    )
    print(
        f"{'teacher':20s} {'rows':>5s} {'top1':>6s} {'tail':>8s} {'clamped before':>15s} {'(tail>1e-4)':>11s} {'now':>5s} "
        f"{'tail err':>9s} {'KL T=1':>8s} {'KL T=4':>8s} {'(T=1 tail)':>10s} {'est T=1':>8s} {'est T=4':>8s}"
    )
    for name, r in cases.items():
        print(
            f"{name:20s} {r['rows']:5d} {r['top1']:6.3f} {r['tail_median']:8.2e} {r['clamped_old']:15.1%} {r['clamped_old_real']:11.1%} "
            f"{r['clamped_now']:5.1%} {r['tail_rel_err']:9.1e} {r['kl'][1.0]:8.4f} {r['kl'][4.0]:8.4f} {r['kl_uniform_t4']:10.4f} "
            f"{r['kl_estimate'][1.0]:8.4f} {r['kl_estimate'][4.0]:8.4f}"
        )
    print(
        "gradient cosine, d loss / d student logits over the batch, rebuilt vs full (students: untrained N(0,1) logits / halfway 0.5 t + N(0,1)):"
    )
    names = list(next(iter(cases.values()))["cosines"])
    print(f"{'teacher':20s} " + " ".join(f"{n:>21s}" for n in names))
    for name, r in cases.items():
        print(
            f"{name:20s} "
            + " ".join(f"{r['cosines'][n]['untrained']:10.4f}/{r['cosines'][n]['halfway']:<10.4f}" for n in names)
        )
    for name, r in cases.items():
        worst = {n: min(r["cosines"][n].values()) for n in ("KD T=1", "DKD T=1 b=2")}
        report.add(
            f"top-k: clamped tails where tail > 1e-4 ({name})",
            f"{r['clamped_now']:.1%}",
            "0",
            r["clamped_now"] == 0,
            f"before (float16 logits, 1 - sum): {r['clamped_old_real']:.1%} of those rows, {r['clamped_old']:.1%} of all",
        )
        report.add(
            f"top-k: gradient cosine KD, DKD at T=1 ({name})",
            f"{min(worst.values()):.4f}",
            ">= 0.99",
            min(worst.values()) >= 0.99,
            f"KD {worst['KD T=1']:.4f}, DKD {worst['DKD T=1 b=2']:.4f}; KD T=4 {min(r['cosines']['KD T=4'].values()):.3f} "
            f"(uniform T=1 tail {min(r['cosines']['KD T=4 (T=1 tail)'].values()):.3f}); DIST {min(r['cosines']['DIST tau=1'].values()):.4f}",
        )


class Report:
    def __init__(self):
        self.rows = []

    def add(self, what, value, target=None, ok=None, note=""):
        self.rows.append((what, value, target, ok, note))

    def print(self):
        w = max(len(r[0]) for r in self.rows)
        print(f"\n{'measure':{w}s}  {'value':>14s}  {'target':>10s}  {'':6s} note")
        for what, value, target, ok, note in self.rows:
            verdict = "" if ok is None else ("PASS" if ok else "MISS")
            print(f"{what:{w}s}  {value:>14s}  {target or '':>10s}  {verdict:6s} {note}")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Object at .* is not recognized")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"environment: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, zarr {zarr.__version__}, "
        f"threads {torch.get_num_threads()}, cpus {cpus}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"setup: synthetic store {args.samples} samples x {args.views} views, block {args.block}, {args.classes} classes, "
        f"features {args.dim}; real teacher {args.teacher} (random init) at {args.teacher_size} px over {args.write_samples} "
        f"samples in units of {args.write_block}; batch {args.batch_size}; repeats {args.repeats}; product codecs: "
        + ", ".join(
            f"{d}: {compressor(d).cname.value}{compressor(d).clevel}-{compressor(d).shuffle.value}"
            for d in ("float16", "int16", "float32")
        )
    )
    report = Report()
    if args.fidelity_only or args.read_only:
        with tempfile.TemporaryDirectory(prefix="store_bench_") as tmp:
            if args.fidelity_only:
                fidelity_section(report, Path(tmp), args)
            else:
                store, syn = write_synthetic_store(Path(tmp) / "syn", args)
                read_section(report, Path(tmp), store, syn["labels"], args)
        report.print()
        return
    with tempfile.TemporaryDirectory(prefix="store_bench_") as tmp:
        tmp = Path(tmp)
        fidelity_section(report, tmp, args)
        t0 = time.perf_counter()
        store, syn = write_synthetic_store(tmp / "syn", args)
        s = syn["stats"]
        print(
            f"synthetic teacher: top-1 probability median {s['top1']:.2f}, top-10 mass median {s['top10']:.3f}, "
            f"top-1 accuracy {s['acc']:.2f} (written in {time.perf_counter() - t0:.1f} s)"
        )

        # -- write: real random-init teacher, extract() into a product store ---------------------
        data = open_dataset(f"fake:{args.write_samples}?size={args.teacher_size}&classes={args.classes}")
        teacher = build_teacher(args.teacher, random_init=True, num_classes=args.classes, input_size=args.teacher_size)
        info = teacher_info(teacher, teacher_rows.output_info(teacher, logits="topk", k=10, dtype="float16"))
        runner = TeacherRunner(teacher, info)
        plan = ViewPlan(ViewRecipe(), seed=0)

        def run_extract(i, block=args.write_block):
            st = open_store(tmp / f"real{i}", data, plan, views=1, block=block, size=args.teacher_size)
            extract(st, data, runner, "real", views=1, batch_size=args.batch_size)
            return st

        real = run_extract(0, args.block)  # the bytes of the product layout; also warms up the teacher
        layout = run_extract(-1)  # the write test's unit layout
        source = StoredViews(layout, stored_plan(layout), 1)
        names = list(plan.fields)
        prerendered = []  # per unit: [(batch table, uint8 views, fingerprints)]
        renderer = ViewRenderer(data, plan, (args.teacher_size,), args.teacher_size)
        for b in range(layout.num_blocks):
            ids = source.ids(b)
            # "row": the commit's block order (stages.extract)
            table = with_partner_params(
                {
                    **source.params(0, b),
                    "id": ids,
                    "view": np.zeros(len(ids), int),
                    "label": data.labels[ids],
                    "unit": np.full(len(ids), b),
                    "check": np.ones(len(ids), bool),
                    "row": np.arange(len(ids)),
                },
                names,
            )
            prerendered.append(
                [
                    (bt, r["views"][0], r["fingerprint"].numpy().astype(np.uint32))
                    for bt, r in render_batches(renderer, even_batches(table, args.batch_size), names, 0, "check")
                ]
            )

        def bare_forward():
            for unit in prerendered:
                for _, x, _ in unit:
                    teacher(normalize(x, teacher.mean, teacher.std))

        counter = iter(range(1, 10**6))

        def fresh_store():
            """A new store and teacher group, made outside the timed region (a real run makes them once)."""
            st = open_store(
                tmp / f"w{next(counter)}", data, plan, views=1, block=args.write_block, size=args.teacher_size
            )
            return st, open_teacher(st, "real", info, data.num_classes, 1), StoredViews(st, plan, 1)

        def forward_and_store(st, group, src, overlap):
            # As extract() does it: with ``overlap`` one writer thread commits a unit while the next one's forward runs.
            with ThreadPoolExecutor(max_workers=1) as writer:
                pending = None
                for b, unit in enumerate(prerendered):
                    parts = [(bt, fp, runner(x, torch.from_numpy(bt["label"]))) for bt, x, fp in unit]
                    if not overlap:
                        _commit_unit(st, src, group, 0, b, parts, False, names)
                        continue
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(_commit_unit, st, src, group, 0, b, parts, False, names)
                if pending is not None:
                    pending.result()

        def render_and_forward():
            for b in range(layout.num_blocks):
                ids = source.ids(b)
                table = with_partner_params(
                    {**plan.draw(0, ids, data.sizes()[ids]), "id": ids, "check": np.ones(len(ids), bool)}, names
                )
                for _, r in render_batches(renderer, even_batches(table, args.batch_size), names, 0, "check"):
                    teacher(normalize(r["views"][0], teacher.mean, teacher.std))

        times = {k: [] for k in ("bare", "store", "store+thread", "render+bare", "extract")}
        for _ in range(args.repeats):  # interleaved, so load bursts hit all alike
            times["bare"].append(median_time(bare_forward, 1))
            for kind, overlap in (("store", False), ("store+thread", True)):
                made = fresh_store()
                times[kind].append(median_time(lambda: forward_and_store(*made, overlap), 1))
            times["render+bare"].append(median_time(render_and_forward, 1))
            times["extract"].append(median_time(lambda: run_extract(next(counter)), 1))
        # What the store alone costs: encode + write + commit, on outputs already computed.
        outs = [[(bt, fp, runner(x, torch.from_numpy(bt["label"]))) for bt, x, fp in unit] for unit in prerendered]

        def store_only(st, group, src):
            for b, parts in enumerate(outs):
                _commit_unit(st, src, group, 0, b, parts, False, names)

        made = [fresh_store() for _ in range(args.repeats)]
        t_store_only = statistics.median(median_time(lambda: store_only(*m), 1) for m in made)
        med = {k: statistics.median(v) for k, v in times.items()}
        nviews = args.write_samples

        # -- bytes per view -------------------------------------------------------------------
        teacher_names = list(LOGIT_ARRAYS)
        per = stored_per_view(store, {"plan": list(PLAN_ARRAYS), "syn": teacher_names + ["features"]})
        per_real = stored_per_view(real, {"plan": list(PLAN_ARRAYS), "real": teacher_names + ["features"]})
        print("\nbytes per view, product store (raw -> stored, x compression):")
        for label, d in (("syn", per), ("real", per_real)):
            print("  " + ", ".join(f"{k} {r:.1f}->{s:.2f} ({r / s:.2f}x)" for k, (r, s) in d.items()))
        for label, d, note in (
            ("syn", per, "synthetic strong-teacher logits, ImageNet-like crops"),
            ("real", per_real, f"random-init {args.teacher}, fake {args.teacher_size} px images"),
        ):
            logit_b = sum(d[f"{label}/{n}"][1] for n in teacher_names)
            plan_b = sum(d[f"plan/{n}"][1] for n in PLAN_ARRAYS)
            report.add(
                f"bytes/view: top-10 + lse + tail + target + plan ({label})",
                f"{logit_b + plan_b:.1f} B",
                "<= 64 B",
                logit_b + plan_b <= 64,
                f"logits {logit_b:.1f} + plan {plan_b:.1f}; {note}",
            )
        over = (store.path / "syn" / "commits").size() + (store.path / "plan" / "commits").size()
        report.add(
            "  (+ commit records, not counted above)",
            f"{over / (args.views * args.samples):.2f} B",
            note="per view, syn store",
        )
        fd = per["syn/features"]
        report.add(
            f"bytes/dim: features float16 (syn, D={args.dim})",
            f"{fd[1] / args.dim:.3f} B",
            "<= 2 B",
            fd[1] / args.dim <= 2,
            f"{fd[0] / fd[1]:.2f}x"
            + (f"; cosine min {syn['fidelity']['syn']['min']:.6f}" if "syn" in syn["fidelity"] else ""),
        )
        fr = per_real["real/features"]
        report.add(
            f"bytes/dim: features float16 (real, D={teacher.feature_dim})",
            f"{fr[1] / teacher.feature_dim:.3f} B",
            "<= 2 B",
            fr[1] / teacher.feature_dim <= 2,
            f"{fr[0] / fr[1]:.2f}x",
        )
        if has_int8() and "syn-int8" in store.teacher_ids():
            d8 = stored_per_view(store, {"syn-int8": ["features", "features_scale"]})
            b8 = sum(s for _, s in d8.values())
            fid = syn["fidelity"]["syn-int8"]
            report.add(
                f"bytes/dim: features int8 + scale (syn, D={args.dim})",
                f"{b8 / args.dim:.3f} B",
                "<= 2 B",
                b8 / args.dim <= 2,
                f"cosine mean {fid['mean']:.6f}, min {fid['min']:.6f}",
            )
        else:
            report.add(
                "bytes/dim: features int8 (SKIPPED)",
                "-",
                "<= 2 B",
                None,
                "teacher_rows.output_info(feature_dtype='int8') not available",
            )

        # -- codecs ---------------------------------------------------------------------------
        t1 = time.perf_counter()
        # two shards (or fewer where an array has fewer rows): enough for a ratio, quick to re-encode
        rows = 2 * args.block

        def head(group, name):
            return group.array(name)[:1, :rows]

        arrays = {f"syn/{n}": head(store.teacher("syn"), n) for n in teacher_names + ["features"]}
        arrays.update({f"plan/{n}": head(store.plan, n) for n in PLAN_ARRAYS})
        arrays.update({f"real/{n}": head(real.teacher("real"), n) for n in teacher_names + ["features"]})
        if "syn-int8" in store.teacher_ids():
            arrays["syn-int8/features"] = head(store.teacher("syn-int8"), "features")
        codecs = codec_table(arrays, args.block)
        cols = list(next(iter(codecs.values())))
        print(
            f"\ncodecs: stored bytes per view in the product layout (shard = 1 view x {args.block} rows, one inner chunk per shard "
            f"up to {zarr_units.CHUNK_BYTES >> 20} MiB, 256-row chunks in the last column); * best; first {rows} rows of view 0 ({time.perf_counter() - t1:.1f} s)"
        )
        print(f"{'array':20s} {'raw':>5s} " + " ".join(f"{c[-11:]:>11s}" for c in cols))
        for name, row in codecs.items():
            best = min(v[0] for c, v in row.items() if c != "product 256-row chunks")
            raw = arrays[name][0, 0].nbytes
            print(
                f"{name:20s} {raw:5.0f} "
                + " ".join(f"{v[0]:10.2f}{'*' if v[0] == best else ' '}" for v in row.values())
            )
        logit_plan = [f"syn/{n}" for n in teacher_names] + [f"plan/{n}" for n in PLAN_ARRAYS]
        print(
            f"{'= syn logits + plan':20s} {'':5s} "
            + " ".join(f"{sum(codecs[n][c][0] for n in logit_plan):11.2f}" for c in cols)
        )
        print(
            f"{'enc krows/s topk_logp':20s} {'':5s} "
            + " ".join(f"{codecs['syn/topk_logp'][c][1] / 1e3:11.0f}" for c in cols)
        )
        print(
            f"{'enc krows/s features':20s} {'':5s} "
            + " ".join(f"{codecs['syn/features'][c][1] / 1e3:11.1f}" for c in cols)
        )
        print(f"(column names: {', '.join(cols)})")

        # -- reading --------------------------------------------------------------------------
        r_zarr = read_section(report, tmp, store, syn["labels"], args)
        tiny = student_rate("resnet10t", {"channels": [8, 16, 32, 64]}, 32, args.classes, args.batch_size, args.repeats)
        r18 = student_rate("resnet18", {}, 64, args.classes, args.batch_size, args.repeats)
        report.add(
            "student views/s: resnet10t 8-16-32-64 @32 px", f"{tiny:,.0f}", note="fwd + KD + bwd + AdamW, pre-rendered"
        )
        report.add("student views/s: resnet18 @64 px", f"{r18:,.0f}")
        report.add("reader / resnet10t-tiny student", f"{r_zarr / tiny:.1f}x", ">= 10x", r_zarr / tiny >= 10)
        report.add("reader / resnet18@64 student", f"{r_zarr / r18:.1f}x", ">= 10x", r_zarr / r18 >= 10)

        # -- writing --------------------------------------------------------------------------
        report.add(
            "teacher forward alone, views/s",
            f"{nviews / med['bare']:,.0f}",
            note=f"{args.teacher} @{args.teacher_size} px, pre-rendered",
        )
        report.add(
            "store alone (write + commit), views/s",
            f"{nviews / t_store_only:,.0f}",
            note="the ceiling one writer sustains",
        )
        for kind, label in (("store", "inline"), ("store+thread", "writer thread, as extract()")):
            ratio = med["bare"] / med[kind]
            report.add(
                f"write: forward+store / forward ({label})",
                f"{ratio:.3f}x",
                ">= 0.9x",
                ratio >= 0.9,
                f"{nviews / med[kind]:,.0f} views/s; per round: "
                + " ".join(f"{a / b:.2f}" for a, b in zip(times["bare"], times[kind])),
            )
        ratio_e = med["render+bare"] / med["extract"]
        report.add(
            "write: extract() / render + forward",
            f"{ratio_e:.3f}x",
            ">= 0.9x",
            ratio_e >= 0.9,
            f"end to end, workers 0; extract {nviews / med['extract']:,.0f} views/s",
        )
    report.print()
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
