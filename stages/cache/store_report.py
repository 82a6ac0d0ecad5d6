"""What a store holds and what its teacher outputs are worth, computed without running any teacher.

``group_usage`` sizes a group's arrays (bytes as stored, per view, compression)
and counts its committed units; ``logit_quality`` measures, over a few whole
committed units, how much probability the top-k keeps and, at the
temperatures a user trains at, what a top-k rebuild loses (measured against a
full-logit store; estimated from a top-k store's own tail statistics); ``render_grid`` replays views exactly
as distillation does and draws them with the teacher's top classes. All of
them return data (numbers, an image); the command line prints and saves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from storage import Store, UserError

from . import teacher_rows
from . import topk
from ..data.datasets import ImageDataset
from ..data.replay import StoredViews, ViewRenderer, check_fingerprints, items, take, unit_table, with_images
from .store_setup import stored_plan


@dataclass(frozen=True)
class ArrayUsage:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # decoded size of the whole [V, N, ...] array
    stored_bytes: int  # bytes as written (compressed shards that exist)
    rows: int  # views x samples that are committed
    committed_nbytes: int = -1  # decoded size of the committed rows only; -1: the whole array (``nbytes``)

    @property
    def bytes_per_view(self) -> float:
        return self.stored_bytes / self.rows if self.rows else float("nan")

    @property
    def ratio(self) -> float:
        """Compression: decoded over stored bytes of the same rows (a partial store stores only its committed rows)."""
        raw = self.nbytes if self.committed_nbytes < 0 else self.committed_nbytes
        return raw / self.stored_bytes if self.stored_bytes else float("nan")


@dataclass(frozen=True)
class GroupUsage:
    """One group (the plan or a teacher): its arrays and how much of it is committed."""

    arrays: list[ArrayUsage]
    views: int  # views the group should hold (the teacher's ``views``; the store's for the plan)
    complete_views: int  # leading views with every block committed
    committed_units: int
    expected_units: int
    rows: int  # committed view-samples, the divisor of bytes per view

    @property
    def total(self) -> ArrayUsage:
        return ArrayUsage(
            "total",
            "",
            (),
            sum(a.nbytes for a in self.arrays),
            sum(a.stored_bytes for a in self.arrays),
            self.rows,
            sum(a.nbytes if a.committed_nbytes < 0 else a.committed_nbytes for a in self.arrays),
        )


def group_usage(store: Store, group, views: int) -> GroupUsage:
    """Sizes and commit counts of ``group`` (any backend with ``describe``), expected to hold ``views`` views."""
    expected = store.units(views)
    committed = group.committed() & set(expected)
    rows = sum(len(store.block_range(b)) for _, b in committed)

    def committed_nbytes(shape, nbytes: int) -> int:  # rows are [V, N] cells of equal size
        cells = shape[0] * shape[1] if len(shape) >= 2 else 0
        return nbytes * rows // cells if cells else nbytes

    arrays = [
        ArrayUsage(
            name,
            d["dtype"],
            tuple(d["shape"]),
            int(d["nbytes"]),
            int(d["stored_bytes"]),
            rows,
            committed_nbytes(tuple(d["shape"]), int(d["nbytes"])),
        )
        for name, d in group.describe(committed).items()
    ]
    return GroupUsage(arrays, views, group.complete_views(store.num_blocks), len(committed), len(expected), rows)


def stats_arrays(store: Store, teacher_id: str) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """``stats/<teacher_id>/`` as {name: (dtype, shape)}, or None when ``pipeline stats`` has not run."""
    root = store.path / "stats" / teacher_id
    if not (root / "stats.json").exists():
        return None
    # The store offers read_stats by name only; the names are whatever `pipeline stats` wrote
    # (stats.json sits beside the arrays, and zarr warns about it when listing).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        names = sorted(name for name, _ in root.open_group("r").arrays())
    out = {}
    for name in names:
        a = store.read_stats(teacher_id, name)
        out[name] = (str(a.dtype), tuple(a.shape))
    return out


def stats_info(store: Store, teacher_id: str) -> dict:
    """stats.json (the views and samples the statistics were reduced from)."""
    return (store.path / "stats" / teacher_id / "stats.json").read_json()


# -- logits: top-k mass and what top-k loses -------------------------------------------------


@dataclass(frozen=True)
class LogitQuality:
    k: int
    units: int  # whole units read
    rows: int
    mass_mean: float  # probability the top k keep, per row
    mass_p5: float
    # temperature -> (mean, 95th percentile) of KL(full || top-k rebuilt) in nats: measured for a
    # full-logit store, estimated from the stored tail statistics (``topk.TopK.tail_kl``) for a top-k store
    kl: dict[float, tuple[float, float]]
    # temperature -> (mean, 95th percentile) of the softened probability the rebuild spreads evenly
    tail_share: dict[float, tuple[float, float]]
    measured: bool  # True: kl against the full logits; False: estimated


def sample_units(committed: set[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """``count`` committed units spread evenly over (view, block) order: deterministic, whole units only."""
    units = sorted(committed)
    if count <= 0 or not units:
        return []
    pick = np.unique(np.linspace(0, len(units) - 1, min(count, len(units))).round().astype(int))
    return [units[i] for i in pick]


def _summary(parts: list[torch.Tensor]) -> tuple[float, float]:
    x = torch.cat(parts).numpy()
    return float(x.mean()), float(np.percentile(x, 95))


def logit_quality(
    store: Store, teacher_id: str, units: int = 4, k: int = 10, temperatures=(1.0, 4.0)
) -> LogitQuality | None:
    """Top-k mass, and what a top-k rebuild loses at each of ``temperatures``, over ``units`` whole committed units.

    ``k`` applies to full-logit stores (what a top-k store would keep, in the
    store's dtype); a top-k store is measured at its own k, from its own tail
    statistics. None when the teacher stores no logits or nothing is committed yet.
    """
    info = store.teacher_info(teacher_id)
    if "logits" not in info.outputs:
        return None
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    group = store.teacher(teacher_id)
    picked = sample_units(group.committed() & set(store.units(info.views)), units)
    if not picked:
        return None
    full = info.logits == "full"
    names = ["logits"] if full else list(topk.ARRAYS)
    k = min(k, info.num_classes) if full else info.k
    masses, kls, shares = [], {t: [] for t in temperatures}, {t: [] for t in temperatures}
    for v, b in picked:
        rows = group.read_unit(v, b, names, rows=len(store.block_range(b)), verify=True)
        if full:
            logits = torch.from_numpy(np.asarray(rows["logits"])).float()  # (B, C)
            rows = topk.TopK.of(logits, k, logits.argmax(1)).rows(info.dtype, "int32")
        rows = topk.TopK.from_rows(rows)
        masses.append(rows.topk_logp.exp().sum(1))
        for t in temperatures:
            shares[t].append(rows.tail_share(info.num_classes, t))
            if full:
                kls[t].append(topk.kl(logits, rows.logits(info.num_classes, t), t))
            else:
                kls[t].append(rows.tail_kl(info.num_classes, t))
    mass = torch.cat(masses).numpy()
    return LogitQuality(
        k,
        len(picked),
        len(mass),
        float(mass.mean()),
        float(np.percentile(mass, 5)),
        {t: _summary(p) for t, p in kls.items()},
        {t: _summary(p) for t, p in shares.items()},
        full,
    )


# -- the grid: what the teacher saw ----------------------------------------------------------

SCALE_TO = 160  # small views are enlarged (nearest neighbour) to at least this many pixels, enough to see
PAD = 4
TOP = 3  # teacher classes written under each view


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def tile_size(view_size: int, mixed: bool = False) -> tuple[int, int]:
    """(width, height) of one grid tile for views rendered at ``view_size``; ``mixed`` adds a line for the partner."""
    side = view_size * max(1, -(-SCALE_TO // view_size))
    return side + 2 * PAD, side + 2 * PAD + (_header_lines(mixed) + TOP) * _line_height()


def _header_lines(mixed: bool) -> int:
    return 3 if mixed else 2  # "#id view v", "true label" (and "+ share partner")


def _line_height() -> int:
    return _font().getbbox("Ag")[3] + 2


def grid_ids(
    dataset: ImageDataset,
    samples: int,
    *,
    seed: int = 0,
    classes: list[str] | None = None,
    ids: list[int] | None = None,
) -> np.ndarray:
    """The samples a grid shows: ``ids`` as given, else a seeded random choice of ``samples`` (from ``classes`` only,
    when named: by name or index). Never 0..N-1: class-ordered data would show its first class alone."""
    n = len(dataset)
    if ids is not None:
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise UserError(f"--grid-ids {bad[0]} is not a sample of the store: its ids run from 0 to {n - 1}")
        return np.asarray(ids, dtype=np.int64)
    pool = np.arange(n)
    if classes:
        index = {name: c for c, name in enumerate(dataset.classes)}
        wanted = [index.get(c, int(c) if c.isdigit() and int(c) < len(dataset.classes) else None) for c in classes]
        unknown = [c for c, w in zip(classes, wanted) if w is None]
        if unknown:
            raise UserError(
                f"--grid-classes {unknown[0]} is no class of the data: its classes are {', '.join(dataset.classes[:12])}"
                f"{', ...' if len(dataset.classes) > 12 else ''}"
            )
        pool = np.flatnonzero(np.isin(dataset.labels, wanted))
        if not len(pool):
            raise UserError(
                f"--grid-classes {','.join(classes)}: the data has no sample of {'this class' if len(classes) == 1 else 'these classes'} "
                "(an empty class folder): name another class"
            )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(samples, len(pool)), replace=False))


def grid_views(store: Store, teacher_id: str, ids: np.ndarray, views: int) -> list[int]:
    """The first ``views`` views committed for all of ``ids``, in the teacher and the plan."""
    info = store.teacher_info(teacher_id)
    blocks = grid_blocks(store, ids)
    done = store.teacher(teacher_id).committed() & store.plan.committed()
    chosen = [v for v in range(info.views) if all((v, b) in done for b in blocks)][:views]
    if not len(ids) or not chosen:
        raise UserError(
            f"teacher '{teacher_id}' in {store.path} has no committed view of the grid's samples yet: finish `pipeline extract` first"
        )
    return chosen


def grid_blocks(store: Store, ids: np.ndarray) -> list[int]:
    """The blocks that hold samples ``ids`` (anywhere in the store's order)."""
    return sorted({int(p) // store.block for p in store.positions(ids)})


def grid_cells(store: Store, dataset: ImageDataset, teacher_id: str, ids: np.ndarray, views: int = 4) -> list[dict]:
    """Replayed views of samples ``ids`` (``grid_ids``), with the teacher's top classes and the label.

    One dict per (sample, view), views inner: ``image`` uint8 (3, S, S) at the
    teacher's input size, ``id``, ``view``, ``label``, ``partner`` (-1 unless
    mixed) and its ``partner_label``, ``lam`` and ``top`` [(class, probability)] (empty without logits).
    Each view is rendered from the store's recorded parameters through the
    distillation renderer and checked against its stored fingerprint, so the
    picture is what the teacher saw.
    """
    info = store.teacher_info(teacher_id)
    group = store.teacher(teacher_id)
    plan = stored_plan(store)
    chosen = grid_views(store, teacher_id, ids, views)
    source = StoredViews(store, plan, store.num_views)
    param_names = list(plan.fields)
    plan_size = store.record.plan.size
    renderer = ViewRenderer(dataset, plan, (info.input_size,), plan_size)
    has_logits = "logits" in info.outputs
    names = teacher_rows.stored_names(info, ["logits"]) if has_logits else []
    cells = {}
    for v in chosen:
        for b in grid_blocks(store, ids):
            # Partners come from the whole unit, so attach them before picking rows.
            table = unit_table(source, v, b, None, param_names)
            block_ids = table["id"]
            pick = np.flatnonzero(np.isin(block_ids, ids))
            batch = take(table, pick)
            top = [[] for _ in pick]
            if has_logits:
                rows = group.read_unit(v, b, names, rows=len(block_ids), verify=True)
                logits = teacher_rows.decode(take(rows, pick), info, ["logits"])["logits"]  # (n, C)
                p, c = torch.softmax(logits, dim=1).topk(min(TOP, logits.shape[1]), dim=1)
                top = [list(zip(c[j].tolist(), p[j].tolist())) for j in range(len(pick))]
            rendered = renderer.render_batch(items(with_images(batch, dataset), param_names, np.ones(len(pick), bool)))
            check_fingerprints(batch, rendered["fingerprint"].numpy(), store)
            for j in range(len(pick)):
                i = int(batch["id"][j])
                partner = int(batch["mix_partner"][j]) if "mix_partner" in batch else -1
                cells[i, v] = {
                    "image": rendered["views"][0][j],
                    "id": i,
                    "view": v,
                    "label": int(dataset.labels[i]),
                    "partner": partner,
                    "partner_label": int(dataset.labels[partner]) if partner >= 0 else -1,
                    "lam": float(rendered["lam"][j, 0]),
                    "top": top[j],
                }
    return [cells[int(i), v] for i in ids for v in chosen]


def _fit(text: str, font, width: int) -> str:
    while text and font.getlength(text) > width:
        text = text[:-1]
    return text


def render_grid(cells: list[dict], classes: list[str], columns: int):
    """A Pillow image: ``cells`` (from ``grid_cells``) row by row, ``columns`` views per row, captions below."""
    from PIL import Image, ImageDraw

    size = cells[0]["image"].shape[-1]
    mixed = any(c["partner"] >= 0 for c in cells)
    tw, th = tile_size(size, mixed)
    side, line, font = tw - 2 * PAD, _line_height(), _font()
    rows = -(-len(cells) // columns)
    grid = Image.new("RGB", (columns * tw, rows * th), "white")
    draw = ImageDraw.Draw(grid)
    for n, cell in enumerate(cells):
        x, y = (n % columns) * tw, (n // columns) * th
        view = Image.fromarray(cell["image"].permute(1, 2, 0).contiguous().numpy())
        grid.paste(view.resize((side, side), Image.NEAREST), (x + PAD, y + PAD))
        caption = [(f"#{cell['id']} view {cell['view']}", "black"), (f"true {classes[cell['label']]}", "black")]
        if cell["partner"] >= 0:  # a mixed view: the teacher saw both images, in these shares
            caption[1] = (f"true {cell['lam']:.2f} {classes[cell['label']]}", "black")
            caption.append((f"+ {1 - cell['lam']:.2f} {classes[cell['partner_label']]} (#{cell['partner']})", "black"))
        elif mixed:
            caption.append(("", "black"))
        for c, p in cell["top"]:
            # a true class green
            caption.append(
                (f"{p:.2f} {classes[c]}", (0, 128, 0) if c in (cell["label"], cell["partner_label"]) else (180, 0, 0))
            )
        for r, (text, colour) in enumerate(caption):
            draw.text((x + PAD, y + PAD + side + 2 + r * line), _fit(text, font, side), fill=colour, font=font)
    return grid
