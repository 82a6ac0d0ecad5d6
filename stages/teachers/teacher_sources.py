"""Where stage two's teacher outputs come from: a store (one teacher or several averaged), or a live teacher.

Every source has the same interface (``TeacherSource``), so the training loop
never asks which kind it holds:

* ``unit_rows(view, block, rows)``: the source's columns for one (view, block)
  unit of the batch table, read whole (nothing for a live teacher);
* ``outputs(batch, views, temperature, needs)``: the teacher's outputs for one batch, as
  ``{"logits": (B, C), "features": (B, D), "tokens": (B, T, D)}`` (the keys
  ``needs`` names, by default the source's own), from the batch's columns or from
  the rendered ``views``; ``temperature`` is the one the method softens teacher
  logits at, for which a top-k cache rebuilds its tail (``stages.cache.topk``);
* ``size``: the render size the source needs (``None``: nothing to render);
* ``num_views``: how many stored views it covers (``None``: any view);
* ``feature_dim``, ``token_shape`` (T, D) and ``token_prefix`` (leading
  non-patch tokens, 1 for a ViT's CLS): the shapes a method is built for
  (``None`` where the source has no such output).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from storage import Store, UserError

from ..cache import teacher_rows
from ..cache import stats
from ..data.replay import Table
from .teachers import Teacher
from ..data.views import normalize


class TeacherSource(ABC):
    needs: tuple[str, ...]
    size: int | None = None
    num_views: int | None = None
    feature_dim: int | None = None
    token_shape: tuple[int, int] | None = None
    token_prefix: int = 0

    def unit_rows(self, view: int, block: int, rows: int) -> Table:
        return {}

    def class_means(self) -> torch.Tensor | None:
        return None

    @abstractmethod
    def outputs(
        self, batch: Table, views: torch.Tensor, temperature: float = 1.0, needs=None
    ) -> dict[str, torch.Tensor]: ...


class CachedTeacher(TeacherSource):
    """Teacher outputs read from a store, one whole unit at a time, only the arrays a method needs."""

    def __init__(self, store: Store, teacher_id: str, needs, prefix: str = "t:"):
        self.prefix = prefix  # the batch-table columns of this teacher's rows
        self.info = store.teacher_info(teacher_id)
        self.group = store.teacher(teacher_id)
        self.store, self.teacher_id, self.needs = store, teacher_id, tuple(needs)
        self.names = teacher_rows.stored_names(self.info, self.needs)
        self.num_views = self.info.views
        self.feature_dim = self.info.feature_dim
        if "tokens" in self.info.outputs:
            self.token_shape, self.token_prefix = (self.info.num_tokens, self.info.token_dim), self.info.token_prefix
        expected = store.units(self.num_views)
        missing = set(expected) - self.group.committed()
        if missing:
            raise UserError(
                f"teacher '{teacher_id}' in {store.path} has {len(expected) - len(missing)} of {len(expected)} units committed: "
                "run the same `pipeline extract` command again to finish it"
            )

    def unit_rows(self, view: int, block: int, rows: int) -> Table:
        return {
            self.prefix + k: v for k, v in self.group.read_unit(view, block, self.names, rows=rows, verify=True).items()
        }

    def class_means(self) -> torch.Tensor | None:
        return stats.class_means(self.store, self.teacher_id)

    def outputs(self, batch: Table, views, temperature: float = 1.0, needs=None) -> dict[str, torch.Tensor]:
        n = len(self.prefix)
        return teacher_rows.decode(
            {k[n:]: v for k, v in batch.items() if k.startswith(self.prefix)},
            self.info,
            needs or self.needs,
            temperature,
        )


class CachedEnsemble(TeacherSource):
    """Several cached teachers as one: their softmax probabilities averaged with ``weights``.

    The averaged distribution is handed on as its log (a valid logit vector),
    so at T = 1 every logit method sees exactly the weighted mean of the
    teachers' probabilities (top-k members are rebuilt for T = 1, where that
    mean is taken).
    """

    def __init__(self, store: Store, teacher_ids: list[str], needs, weights: list[float] | None = None):
        if set(needs) - {"logits"}:
            raise UserError(
                f"several teachers are averaged over their logits; a method that reads {', '.join(sorted(set(needs) - {'logits'}))} takes one --teacher-id"
            )
        weights = weights or [1.0] * len(teacher_ids)
        if len(weights) != len(teacher_ids) or min(weights) < 0 or sum(weights) <= 0:
            raise UserError(f"--teacher-weights needs {len(teacher_ids)} non-negative numbers, not {weights}")
        self.members = [CachedTeacher(store, tid, needs, prefix=f"t{j}:") for j, tid in enumerate(teacher_ids)]
        classes = {m.info.num_classes for m in self.members}
        if len(classes) > 1:
            raise UserError(
                f"teachers {', '.join(teacher_ids)} predict different numbers of classes ({sorted(classes)})"
            )
        self.weights = torch.tensor(weights, dtype=torch.float32) / sum(weights)
        self.num_views = min(m.num_views for m in self.members)
        self.needs = tuple(needs)

    def unit_rows(self, view, block, rows) -> Table:
        return {k: v for m in self.members for k, v in m.unit_rows(view, block, rows).items()}

    def outputs(self, batch, views, temperature: float = 1.0, needs=None) -> dict[str, torch.Tensor]:
        probs = sum(
            w * torch.softmax(m.outputs(batch, views)["logits"], dim=1) for w, m in zip(self.weights, self.members)
        )
        return {"logits": torch.log(probs)}


class LiveTeacher(TeacherSource):
    """The teacher run on the same replayed views, at its own input size and normalisation."""

    def __init__(self, teacher: Teacher, needs, class_means: torch.Tensor | None = None):
        self.teacher, self.needs, self._class_means = teacher, tuple(needs), class_means
        self.size, self.feature_dim = teacher.input_size, teacher.feature_dim
        missing = [k for k in self.needs if k not in teacher.outputs]
        if missing:
            raise UserError(f"teacher '{teacher.spec.name}' has no {', '.join(missing)} output, which the method needs")
        if "tokens" in self.needs:  # one dry forward, only for methods that read tokens
            self.token_shape, self.token_prefix = teacher.token_shape, teacher.token_prefix

    def class_means(self) -> torch.Tensor | None:
        return self._class_means

    def outputs(self, batch, views, temperature: float = 1.0, needs=None) -> dict[str, torch.Tensor]:
        out = self.teacher(normalize(views, self.teacher.mean, self.teacher.std), self.needs)
        return {k: out[k] for k in needs or self.needs}


class PartsTeacher(TeacherSource):
    """The teachers of a composite method's parts (``stages.methods.composite``).

    Each distinct teacher is one source that reads (or runs) what all its parts need, once per unit or
    batch; part i's outputs come out under ``"i:"`` (``"0:logits"``), decoded at that part's temperature
    (``outputs`` takes one temperature per part). ``part(i)`` is part i's own source, for its method's set-up.
    """

    def __init__(self, sources: dict[str, TeacherSource], part_teachers: list[str | None]):
        self.sources, self.part_teachers = sources, part_teachers
        self.needs = tuple(dict.fromkeys(k for s in sources.values() for k in s.needs))
        live = {s.size for s in sources.values() if s.size is not None}
        if len(live) > 1 or (live and any(s.size is None for s in sources.values())):
            raise UserError("the parts' teachers must all be cached or all run live at one render size")
        self.size = next(iter(live), None)
        counts = [s.num_views for s in sources.values() if s.num_views is not None]
        self.num_views = min(counts) if counts else None

    def part(self, index: int) -> TeacherSource | None:
        teacher = self.part_teachers[index]
        return None if teacher is None else self.sources[teacher]

    def unit_rows(self, view, block, rows) -> Table:
        return {k: v for s in self.sources.values() for k, v in s.unit_rows(view, block, rows).items()}

    def outputs(self, batch, views, temperature=(), needs=None) -> dict[str, torch.Tensor]:
        out, done = {}, {}
        for i, (teacher, t) in enumerate(zip(self.part_teachers, temperature)):
            if teacher is None:
                continue
            source = self.sources[teacher]
            # a live teacher runs once a batch, whatever the temperatures
            key = (teacher, None if source.size is not None else t)
            if key not in done:
                done[key] = source.outputs(batch, views, t)
            out.update({f"{i}:{k}": v for k, v in done[key].items()})
        return out


def pick_teacher(store: Store, requested: str | None) -> str:
    """The teacher id named by --teacher-id, or the store's only one."""
    ids = store.teacher_ids()
    if requested:
        store.teacher_info(requested)  # names the known teachers when it is not there
        return requested
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise UserError(
            f"store {store.path} holds no teacher yet: run `pipeline extract --store {store.path} ...` first"
        )
    raise UserError(f"store {store.path} holds teachers {', '.join(ids)}: choose one with --teacher-id")


def cached_teacher(store: Store, teacher: str | None, teacher_weights: str | None, needs) -> TeacherSource | None:
    """The cached teacher(s) named by --teacher-id (one id, or a,b averaged with --teacher-weights); None when the method needs none."""
    if not needs:
        return None
    if teacher and "," in teacher:
        weights = [float(w) for w in teacher_weights.split(",")] if teacher_weights else None
        return CachedEnsemble(store, [pick_teacher(store, t.strip()) for t in teacher.split(",")], needs, weights)
    return CachedTeacher(store, pick_teacher(store, teacher), needs)


def cached_parts(store: Store, parts: list[tuple[str, str | None, tuple]], teacher: str | None) -> PartsTeacher:
    """The cached teachers of a composite method's parts, each given as (name, its own teacher or None, what it
    reads): a part's own teacher, else the run's ``--teacher-id``, else the store's only one; each checked for
    what its parts read."""
    if teacher and "," in teacher:
        raise UserError(
            f"--teacher-id {teacher} averages teachers under one method; a composite names each part's teacher (METHOD@TEACHER)"
        )
    needs, ids = {}, []
    for name, own, part_needs in parts:
        if not part_needs:
            ids.append(None)
            continue
        if own is None and teacher is None and len(store.teacher_ids()) > 1:
            raise UserError(
                f"part {name} names no teacher and store {store.path} holds {', '.join(store.teacher_ids())}: write it as METHOD@TEACHER"
            )
        tid = pick_teacher(store, own or teacher)
        ids.append(tid)
        needs[tid] = tuple(dict.fromkeys([*needs.get(tid, ()), *part_needs]))
    sources = {}
    for j, (tid, wanted) in enumerate(needs.items()):
        try:
            sources[tid] = CachedTeacher(store, tid, wanted, prefix=f"t{j}:")
        except UserError as e:
            users = ", ".join(p[0] for p, i in zip(parts, ids) if i == tid)
            raise UserError(f"teacher '{tid}' (read by part {users}): {e}") from e
    return PartsTeacher(sources, ids)
