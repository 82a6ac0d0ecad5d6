"""Image datasets with stable integer ids, labels and a fingerprint.

Every sample ``i`` in ``range(len(ds))`` has a key (a stable name), a label and
an image returned as a uint8 (3, H, W) tensor. The fingerprint hashes count,
keys and labels, so a store made from one dataset is never used with another.

Sources (``open_dataset``; each kind is one ``@register_dataset`` function below, opening a dataset class of its own module):
  digits          scikit-learn's handwritten digits, upscaled to 32 px RGB, fixed stratified split (``stages.data.toy_datasets``)
  folder:PATH     one sub-folder per class, like torchvision's ImageFolder (``stages.data.folder_dataset``)
  fake:N          N synthetic images (options: fake:N?size=64&classes=10), for tests and benchmarks
  wds:PATTERN     webdataset tar shards (KEY.jpg + KEY.cls), local or at a URL (``stages.data.wds_dataset``)
  hfds:PATH       a Hugging Face dataset: a local save_to_disk or parquet folder, or a hub name (``stages.data.hf_dataset``)

Validation data (``validation_data``) is a source of any kind, checked to have the training data's classes.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl


from storage import UserError
from storage.registry import Registry

from .folder_dataset import FolderDataset
from .image_dataset import ImageDataset
from .toy_datasets import DigitsDataset, FakeDataset

log = logging.getLogger(__name__)


# -- the registry of sources ------------------------------------------------------------------
#
# A source is ``KIND`` or ``KIND:ARGUMENT``; each kind is one function registered here that opens a split.
# A new source is one more ``@register_dataset`` function, as ``wds:PATTERN`` below is.


@dataclass(frozen=True)
class DatasetKind:
    """A registered kind of source: ``opener(argument, split)`` returns the dataset (``split``: "train" or "val")."""

    name: str
    opener: Callable[[str, str], ImageDataset]
    usage: str  # how a user writes it: "digits", "folder:PATH"
    own_val_split: bool  # False: validation data only from --val-data (a folder or shards are one split)

    @property
    def takes_argument(self) -> bool:
        return ":" in self.usage


_DATASETS: Registry = Registry("data source")


def register_dataset(name: str, usage: str | None = None, own_val_split: bool = True):
    """Register ``opener(argument, split) -> ImageDataset`` as the source kind ``name``.

    ``usage`` is how the source is written (``"folder:PATH"``; a ``:`` means it takes an argument).
    ``own_val_split``: ``opener(argument, "val")`` gives the source's own validation part (digits, fake, an HF
    dataset's validation split); without it, ``split`` is ignored: the argument names the data, training or validation.
    """

    def wrap(opener):
        _DATASETS.add(name, DatasetKind(name, opener, usage or name, own_val_split))
        return opener

    return wrap


def list_datasets() -> list[str]:
    """How each registered kind is written, e.g. ``["digits", "fake:N", "folder:PATH"]``."""
    return [_DATASETS[k].usage for k in sorted(_DATASETS)]


def dataset_kind(source: str) -> DatasetKind:
    """The registered kind of ``source``; a miss names the known kinds and what to pass."""
    name, _, rest = source.partition(":")
    kind = _DATASETS.get(name)
    if kind is None:
        close = difflib.get_close_matches(name, _DATASETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"unknown dataset '{source}'{hint}: known kinds are {', '.join(list_datasets())}; pass one of them, e.g. --data digits"
        )
    if kind.takes_argument and not rest:
        raise UserError(f"dataset '{source}' needs an argument: use {kind.usage}")
    if not kind.takes_argument and rest:
        raise UserError(f"dataset '{source}' takes no argument: use {kind.usage}")
    return kind


def open_dataset(source: str, split: str = "train") -> ImageDataset:
    """The dataset named by ``source``; ``split="val"`` gives its validation part where it has one of its own."""
    return dataset_kind(source).opener(source.partition(":")[2], split)


def source_options(source: str, query: str, known: tuple[str, ...], usage: str) -> dict[str, str]:
    """The ``?KEY=VALUE&...`` options of a source (``fake:N?size=64``), each known and given once; else one line."""
    try:
        pairs = parse_qsl(query, strict_parsing=True) if query else []
    except ValueError:
        raise UserError(f"bad dataset '{source}': options are KEY=VALUE joined by '&'; {usage}") from None
    unknown = sorted({k for k, _ in pairs} - set(known))
    if unknown:
        raise UserError(
            f"bad dataset '{source}': unknown option {', '.join(unknown)} (known: {', '.join(known)}); {usage}"
        )
    twice = sorted({k for k, _ in pairs if sum(k == j for j, _ in pairs) > 1})
    if twice:
        raise UserError(f"bad dataset '{source}': option {', '.join(twice)} given twice; {usage}")
    return dict(pairs)


@register_dataset("digits")
def _open_digits(_argument: str, split: str) -> ImageDataset:
    return DigitsDataset(split)


@register_dataset("fake", usage="fake:N")
def _open_fake(argument: str, split: str) -> ImageDataset:
    count, _, query = argument.partition("?")
    usage = "use fake:N or fake:N?size=64&classes=10"
    values = {"N": count, **source_options(f"fake:{argument}", query, FAKE_OPTIONS, usage)}
    opts = {name: _bounded_int(name, values[name], *FAKE_BOUNDS[name], f"fake:{argument}", usage) for name in values}
    n = opts.pop("N")
    data = FakeDataset(n if split == "train" else max(n // 5, 1), split=split, **opts)
    # The whole spec, so that a store's recorded source reopens the same images.
    data.source = f"fake:{n}?size={data.size}&classes={len(data.classes)}"
    return data


FAKE_OPTIONS = ("size", "classes")
# sanity bounds: larger is a typing mistake
FAKE_BOUNDS = {"N": (1, 10_000_000), "size": (1, 4096), "classes": (1, 100_000)}


def _bounded_int(name: str, text: str, lo: int, hi: int, source: str, usage: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise UserError(
            f"bad fake dataset '{source}': {name} must be an integer in [{lo}, {hi}], not '{text}'; {usage}"
        )
    return value


@register_dataset("folder", usage="folder:PATH", own_val_split=False)
def _open_folder(root: str, _split: str) -> ImageDataset:
    return FolderDataset(root)


@register_dataset("wds", usage="wds:PATTERN", own_val_split=False)
def _open_wds(pattern: str, _split: str) -> ImageDataset:
    from .wds_dataset import WdsDataset  # fsspec and tar reading only where shards are asked for

    return WdsDataset(pattern)


HFDS_OPTIONS = ("split", "image", "label")


@register_dataset("hfds", usage="hfds:PATH", own_val_split=True)
def _open_hfds(argument: str, split: str) -> ImageDataset:
    from .hf_dataset import HfDataset  # pyarrow (and datasets, for a hub name) only where an HF dataset is asked for

    name, _, query = argument.partition("?")
    usage = "use hfds:PATH or hfds:PATH?split=train&image=image&label=label"
    opts = source_options(f"hfds:{argument}", query, HFDS_OPTIONS, usage)
    if not name or any(not v for v in opts.values()):
        raise UserError(f"bad dataset 'hfds:{argument}': a path or hub name, and options with values; {usage}")
    return HfDataset(name, opts.get("split"), split, image=opts.get("image", "image"), label=opts.get("label", "label"))


# -- validation data ----------------------------------------------------------------------------


def validation_data(train: ImageDataset | str, val_source: str | None) -> ImageDataset | None:
    """The validation data for the training data ``train`` (its dataset; a source is opened here first).

    ``val_source`` (``--val-data``) may be any kind of source, opened as its own kind; a bare path or URL is of the
    training data's kind. Without it, a kind with a validation split of its own (digits, fake, an HF dataset's
    ``validation``) gives that, and a folder or shards none (a warning). The validation labels must mean the training
    classes (``check_classes``); the validation dataset then carries the training data's class names.
    """
    if isinstance(train, str):
        train = open_dataset(train)
    kind = dataset_kind(train.source)
    if val_source:
        val = open_dataset(_val_source(kind, val_source), "val")
    elif kind.own_val_split:
        val = open_dataset(train.source, "val")
        # an HF dataset of one split (or ?split= naming another) has no other
        if val.fingerprint() == train.fingerprint():
            raise UserError(
                f"{train.source} has no validation split apart from its training data: pass --val-data with other images "
                f"(one of {', '.join(list_datasets())})"
            )
    else:
        log.warning("no validation data: pass --val-data %s to evaluate each epoch", kind.usage)
        return None
    check_classes(train, val)
    val.classes = list(train.classes)
    return val


def _val_source(kind: DatasetKind, val_source: str) -> str:
    """``--val-data`` as a source: as written where it names a kind (``wds:...``), else (a bare path or URL, ``s3://``
    included) of the training data's kind."""
    if val_source in _DATASETS or re.match(r"[A-Za-z]\w*:(?!//)", val_source):
        return val_source
    if not kind.takes_argument:
        raise UserError(
            f"--val-data {val_source} names no kind of source: write it as one of {', '.join(list_datasets())}"
        )
    return f"{kind.name}:{val_source}"


def numbered(classes) -> bool:
    """Whether class names are only the label numbers "0".."N-1": a source that names no classes (raw shards, an HF
    dataset without ClassLabel names), whose labels are all that says what a class is."""
    return list(classes) == [str(c) for c in range(len(classes))]


def check_classes(train: ImageDataset, val: ImageDataset) -> None:
    """Refuse validation data whose labels may mean other classes than the training data's, in one line.

    Where both name their classes, the names must be the same, in the same order (label c is class c of both). Where
    either has only numbers, the counts decide: the validation data may use fewer classes when its own are numbers
    (its count comes from its largest label), else it must have as many.
    """
    t, v = list(train.classes), list(val.classes)
    where = f"the validation data {val.source} does not have the classes of the training data {train.source}"
    if not numbered(t) and not numbered(v):
        if v != t:
            raise UserError(f"{where}: {_class_difference(t, v)}; the labels must mean the same classes")
        return
    if len(v) > len(t) or (not numbered(v) and len(v) != len(t)):
        theirs = f"labels up to {len(v) - 1}" if numbered(v) else f"{_few(v)}"
        raise UserError(
            f"{where}: it has {len(v)} classes ({theirs}), the training data {len(t)} ({_few(t)}); the labels must mean the same classes"
        )


def _class_difference(train: list[str], val: list[str]) -> str:
    """What differs between two lists of class names, in a few words."""
    missing, extra = [c for c in train if c not in set(val)], [c for c in val if c not in set(train)]
    parts = [f"{len(missing)} of its {len(train)} classes missing ({_few(missing)})"] if missing else []
    parts += [f"{len(extra)} not among them ({_few(extra)})"] if extra else []
    if not parts:
        i = next(i for i, (a, b) in enumerate(zip(train, val)) if a != b)
        parts = [
            f"the same {len(train)} names in another order (class {i} is {val[i]} here, {train[i]} in the training data)"
        ]
    return "; ".join(parts)


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")
