"""What a store holds and what its teacher outputs are worth, computed without running any teacher.

``group_usage`` sizes a group's arrays (bytes as stored, per view, compression)
and counts its committed units; ``logit_quality`` measures, over a few whole
committed units, how much probability the top-k keeps and, for a full-logit
store, the KL a top-k store would lose; ``render_grid`` replays views exactly
as distillation does and draws them with the teacher's top classes. All of
them return data (numbers, an image); the command line prints and saves.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from storage import Store, UserError

from . import cache
from .datasets import ImageDataset
from .replay import StoredViews, ViewRenderer, items, take, with_partner_params


@dataclass(frozen=True)
class ArrayUsage:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # decoded size of the whole [V, N, ...] array
    stored_bytes: int  # bytes as written (compressed shards that exist)
    rows: int  # views x samples that are committed

    @property
    def bytes_per_view(self) -> float:
        return self.stored_bytes / self.rows if self.rows else float("nan")

    @property
    def ratio(self) -> float:
        return self.nbytes / self.stored_bytes if self.stored_bytes else float("nan")


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
            "total", "", (), sum(a.nbytes for a in self.arrays), sum(a.stored_bytes for a in self.arrays), self.rows
        )


def group_usage(store: Store, group, views: int) -> GroupUsage:
    """Sizes and commit counts of ``group`` (any backend with ``describe``), expected to hold ``views`` views."""
    expected = {(v, b) for v in range(views) for b in range(store.num_blocks)}
    committed = group.committed() & expected
    rows = sum(len(store.block_range(b)) for _, b in committed)
    arrays = [
        ArrayUsage(name, d["dtype"], tuple(d["shape"]), int(d["nbytes"]), int(d["stored_bytes"]), rows)
        for name, d in group.describe().items()
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
    kl: dict[float, tuple[float, float]]  # temperature -> (mean, 95th percentile) of KL(full || top-k rebuilt); full stores only


def sample_units(committed: set[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """``count`` committed units spread evenly over (view, block) order: deterministic, whole units only."""
    units = sorted(committed)
    if count <= 0 or not units:
        return []
    pick = np.unique(np.linspace(0, len(units) - 1, min(count, len(units))).round().astype(int))
    return [units[i] for i in pick]


def topk_mass(values: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(B,) probability mass of top-k logits ``values`` (B, k) under the softmax normaliser ``lse`` (B,)."""
    return torch.exp(values.double() - lse.double().view(-1, 1)).sum(1)


def kl_full_vs_topk(logits: torch.Tensor, k: int, temperature: float = 1.0) -> torch.Tensor:
    """(B,) KL(softmax(full / T) || softmax(rebuilt / T)), rebuilt by ``cache.logits_from_topk`` from the row's top k."""
    logits = logits.float()  # (B, C)
    values, index = logits.topk(k, dim=1)
    rebuilt = cache.logits_from_topk(values, index, torch.logsumexp(logits, dim=1), logits.shape[1])
    p = torch.log_softmax(logits.double() / temperature, dim=1)
    q = torch.log_softmax(rebuilt.double() / temperature, dim=1)
    return (p.exp() * (p - q)).sum(1).clamp_min(0.0)  # rounding can give -1e-17


def logit_quality(store: Store, teacher_id: str, units: int = 4, k: int = 10, temperatures=(1.0, 4.0)) -> LogitQuality | None:
    """Top-k mass and (full-logit stores) KL to the top-k rebuild, over ``units`` whole committed units.

    ``k`` applies to full-logit stores (what a top-k store would keep); a top-k
    store is measured at its own k. None when the teacher stores no logits or
    nothing is committed yet.
    """
    info = store.teacher_info(teacher_id)
    if "logits" not in info["outputs"]:
        return None
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    group = store.teacher(teacher_id)
    expected = {(v, b) for v in range(info["views"]) for b in range(store.num_blocks)}
    picked = sample_units(group.committed() & expected, units)
    if not picked:
        return None
    full = info["logits"] == "full"
    names = ["logits"] if full else ["topk_values", "logsumexp"]
    k = min(k, info["num_classes"]) if full else info["k"]
    masses, kls = [], {t: [] for t in temperatures}
    for v, b in picked:
        rows = group.read_unit(v, b, names, rows=len(store.block_range(b)), verify=True)
        if full:
            logits = torch.from_numpy(np.asarray(rows["logits"])).float()  # (B, C)
            masses.append(topk_mass(logits.topk(k, dim=1).values, torch.logsumexp(logits, dim=1)))
            for t in temperatures:
                kls[t].append(kl_full_vs_topk(logits, k, t))
        else:
            masses.append(topk_mass(torch.from_numpy(np.asarray(rows["topk_values"])), torch.from_numpy(np.asarray(rows["logsumexp"]))))
    mass = torch.cat(masses).numpy()
    kl = {}
    for t, parts in kls.items() if full else ():
        x = torch.cat(parts).numpy()
        kl[t] = (float(x.mean()), float(np.percentile(x, 95)))
    return LogitQuality(k, len(picked), len(mass), float(mass.mean()), float(np.percentile(mass, 5)), kl)


# -- the grid: what the teacher saw ----------------------------------------------------------

SCALE_TO = 128  # small views are enlarged (nearest neighbour) to at least this many pixels
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


def grid_views(store: Store, teacher_id: str, samples: int, views: int) -> tuple[np.ndarray, list[int]]:
    """Sample ids 0..samples-1 and the first ``views`` views committed for all of them, in the teacher and the plan."""
    info = store.teacher_info(teacher_id)
    ids = np.arange(min(samples, store.num_samples))
    blocks = sorted({int(i) // store.block for i in ids})
    done = store.teacher(teacher_id).committed() & store.plan.committed()
    chosen = [v for v in range(info["views"]) if all((v, b) in done for b in blocks)][:views]
    if not len(ids) or not chosen:
        raise UserError(f"teacher '{teacher_id}' in {store.path} has no committed view of samples 0..{len(ids) - 1} yet: finish `pipeline extract` first")
    return ids, chosen


def grid_cells(store: Store, dataset: ImageDataset, teacher_id: str, samples: int = 16, views: int = 4) -> list[dict]:
    """Replayed views of the first ``samples`` samples, with the teacher's top classes and the label.

    One dict per (sample, view), views inner: ``image`` uint8 (3, S, S) at the
    teacher's input size, ``id``, ``view``, ``label``, ``partner`` (-1 unless
    mixed) and its ``partner_label``, ``lam`` and ``top`` [(class, probability)] (empty without logits).
    Each view is rendered from the store's recorded parameters through the
    distillation renderer and checked against its stored fingerprint, so the
    picture is what the teacher saw.
    """
    from .extract import stored_plan  # extract imports replay and teachers; keep the dependency local

    info = store.teacher_info(teacher_id)
    group = store.teacher(teacher_id)
    plan = stored_plan(store)
    ids, chosen = grid_views(store, teacher_id, samples, views)
    source = StoredViews(store, plan, store.num_views)
    param_names = list(plan.fields)
    plan_size = store.meta["plan"]["size"]
    renderer = ViewRenderer(dataset, plan, (info["input_size"],), plan_size)
    has_logits = "logits" in info["outputs"]
    names = cache.stored_names(info, ["logits"]) if has_logits else []
    cells = {}
    for v in chosen:
        for b in sorted({int(i) // store.block for i in ids}):
            block_ids = source.ids(b)
            # Partners come from the whole unit, so attach them before picking rows.
            table = with_partner_params({**source.params(v, b), "id": block_ids}, param_names)
            pick = np.flatnonzero(np.isin(block_ids, ids))
            batch = take(table, pick)
            top = [[] for _ in pick]
            if has_logits:
                rows = group.read_unit(v, b, names, rows=len(block_ids), verify=True)
                logits = cache.decode(take(rows, pick), info, ["logits"])["logits"]  # (n, C)
                p, c = torch.softmax(logits, dim=1).topk(min(TOP, logits.shape[1]), dim=1)
                top = [list(zip(c[j].tolist(), p[j].tolist())) for j in range(len(pick))]
            for j, item in enumerate(items(batch, param_names, np.ones(len(pick), bool))):
                out = renderer[item]
                if out["fingerprint"] != int(batch["fingerprint"][j]):
                    raise UserError(
                        f"view {v} of sample {item[0]} replays differently from the view the teacher saw: the images or an "
                        f"imaging library changed since extraction; compare the versions in {store.path}/store.json with this environment"
                    )
                partner = int(batch["mix_partner"][j]) if "mix_partner" in batch else -1
                cells[item[0], v] = {
                    "image": out["views"][0], "id": item[0], "view": v, "label": int(dataset.labels[item[0]]),
                    "partner": partner, "partner_label": int(dataset.labels[partner]) if partner >= 0 else -1,
                    "lam": float(out["lam"][0]), "top": top[j],
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
            caption.append((f"{p:.2f} {classes[c]}", (0, 128, 0) if c in (cell["label"], cell["partner_label"]) else (180, 0, 0)))  # a true class green
        for r, (text, colour) in enumerate(caption):
            draw.text((x + PAD, y + PAD + side + 2 + r * line), _fit(text, font, side), fill=colour, font=font)
    return grid
