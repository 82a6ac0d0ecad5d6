"""Frozen teachers: a registry of short names over timm models, and how to load their weights.

Every teacher maps a normalised image batch to ``dict[str, Tensor]`` with the
keys its spec lists: ``logits`` (B, C) and/or ``features`` (B, D), the pooled
pre-logits feature; on request also ``tokens`` (B, T, D), which every timm
model has (CLS plus patch tokens for ViTs, the last feature map's positions
for CNNs). Any timm model name works as a teacher; the short names below pin
the hub weights and input size people mean by them. A timm model folder works too,
``local-dir:PATH`` (what ``pipeline train`` writes) or ``hf-hub:REPO``: its
``config.json`` says the architecture, model arguments, input size, normalisation,
interpolation and class count, read by timm's own reader.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import timm
import torch
from torch import nn

from storage import UserError
from storage.registry import Registry
from storage.store_record import MAX_SIZE

from ..model_outputs import token_prefix

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is. ``None`` fields fall back to timm's pretrained config for the model."""

    name: str
    timm_name: str
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    outputs: tuple[str, ...] = ("logits", "features")
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    interpolation: str | None = None  # how the teacher's own evaluation resized images (a model folder's config.json)
    num_classes: int | None = None  # classifier width from a model folder's config.json; None: from the weights


_TEACHERS: Registry = Registry("teacher")


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    return _TEACHERS.add(spec.name, spec)


def list_teachers() -> list[str]:
    return sorted(_TEACHERS)


# DINOv2 has no classifier and a 518 px default; people use it at 224 (FACTS.md).
for _size, _arch in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
    for _reg, _tag in (("", ""), ("_reg", "reg4_")):
        register_teacher(
            TeacherSpec(
                f"dinov2_{_size}{_reg}",
                f"vit_{_arch}_patch14_{_tag}dinov2.lvd142m",
                input_size=224,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                outputs=("features",),
                kwargs={"img_size": 224},
            )
        )
register_teacher(
    TeacherSpec("beitv2_b", "beitv2_base_patch16_224.in1k_ft_in22k_in1k", 224, IMAGENET_MEAN, IMAGENET_STD)
)
register_teacher(
    TeacherSpec("beitv2_l", "beitv2_large_patch16_224.in1k_ft_in22k_in1k", 224, IMAGENET_MEAN, IMAGENET_STD)
)
register_teacher(TeacherSpec("resnet152", "resnet152.a1h_in1k", 224, IMAGENET_MEAN, IMAGENET_STD))


def resolve_teacher(name: str) -> TeacherSpec:
    """The registered spec for ``name``, a model folder's (``local-dir:PATH``, ``hf-hub:REPO``), or a spec for any timm model of that name."""
    if name in _TEACHERS:
        return _TEACHERS[name]
    folder = model_folder(name, weights=False)
    if folder is not None:
        return _folder_spec(name, folder)
    if timm.is_model(name):
        cfg = timm.models.get_pretrained_cfg(name)
        return TeacherSpec(
            name,
            name,
            input_size=cfg.input_size[-1] if cfg else None,
            mean=tuple(cfg.mean) if cfg else None,
            std=tuple(cfg.std) if cfg else None,
            # A model built for one input size (ViTs: position embeddings) is built for the render size instead.
            kwargs={"img_size": cfg.input_size[-1]} if cfg and cfg.fixed_input_size else {},
        )
    close = difflib.get_close_matches(name, list(_TEACHERS) + timm.list_models(), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"known short names: {', '.join(list_teachers())}"
    raise UserError(
        f"unknown teacher '{name}': {hint} (any timm model name also works, and a timm model folder as local-dir:PATH or hf-hub:REPO)"
    )


FOLDER_SOURCES = ("local-dir", "hf-hub", "hf_hub")  # timm's model sources (hf_hub: its older spelling)
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a hub repo, in its order


def model_folder(name: str, weights: bool = True) -> Path | None:
    """The local folder of a ``local-dir:PATH`` or ``hf-hub:REPO[@REVISION]`` teacher; None for any other name.

    A hub repo's folder is its snapshot in the hub cache, downloaded when the hub can be reached (``weights``:
    its weights file too, else config.json alone); offline, the cached snapshot, or one line saying what is missing.
    """
    source, sep, ident = name.partition(":")
    if not sep or source not in FOLDER_SOURCES:
        return None
    if not ident:
        raise UserError(
            f"teacher '{name}' names no folder: pass local-dir:PATH (a timm model folder, as `pipeline train` writes) or hf-hub:REPO"
        )
    if source == "local-dir":
        folder = Path(ident).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"teacher '{name}': {folder} is not a folder; local-dir: takes a timm model folder (config.json and weights, as `pipeline train` writes)"
            )
        return folder
    from timm.models._hub import hf_split

    repo, revision = hf_split(ident)
    online = _hub_reachable()
    wanted = [("config.json",)] + ([HUB_WEIGHTS] if weights else [])
    found = []
    for choices in wanted:  # config.json, then the first weights file the repo has
        found.append(next((path for f in choices if (path := _hub_file(name, repo, revision, f, online))), None))
        if found[-1] is None:
            where = (
                "which the hub does not hold"
                if online
                else "which are not in the local hub cache, and the hub cannot be reached"
            )
            raise UserError(
                f"teacher '{name}' needs {' or '.join(choices)} of hub repo {repo}, {where}: "
                "download the repo elsewhere and pass its folder as --teacher local-dir:FOLDER"
            )
    return Path(found[0]).parent  # the revision's snapshot folder, which holds every file of it


def _hub_file(name: str, repo: str, revision: str | None, filename: str, online: bool) -> str | None:
    """A hub repo's file in the local hub cache: fetched (or refreshed) when ``online``, else the cached copy; None when there is none."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    if not online:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        return found if isinstance(found, str) else None
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, OSError) as e:  # no such repo or revision, a gated repo, a failed download
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"teacher '{name}': cannot fetch {filename} of hub repo {repo} ({type(e).__name__}: {first})"
        ) from None


def _folder_spec(name: str, folder: Path) -> TeacherSpec:
    """A model folder's teacher: architecture, model arguments, input size, normalisation, interpolation and class
    count from its config.json, read by timm's own reader (as ``timm.create_model("local-dir:PATH")`` reads it)."""
    from timm.models._hub import load_model_config_from_path

    try:
        cfg, architecture, model_args = load_model_config_from_path(folder)
    except FileNotFoundError:
        raise UserError(
            f"teacher '{name}': {folder} holds no config.json; a timm model folder has one beside its weights "
            "(`pipeline train` writes both; for weights alone pass --teacher MODEL --weights FILE)"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or JSON without timm's fields
        raise UserError(
            f"teacher '{name}': {folder / 'config.json'} is not a timm model config ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if not timm.is_model(architecture):
        raise UserError(
            f"teacher '{name}': config.json names architecture '{architecture}', which this timm ({timm.__version__}) does not know"
        )
    return TeacherSpec(
        name,
        architecture,
        input_size=cfg.get("input_size", (3, None, None))[-1],
        mean=tuple(cfg["mean"]) if cfg.get("mean") else None,
        std=tuple(cfg["std"]) if cfg.get("std") else None,
        kwargs={
            k: v for k, v in model_args.items() if k != "num_classes"
        },  # the class count is build_teacher's to pass
        interpolation=cfg.get("interpolation"),
        num_classes=cfg.get("num_classes"),
    )


def weights_in_folder(folder: Path) -> Path:
    """The weights file timm loads from a model folder (``timm.models._hub.load_state_dict_from_path``'s choice)."""
    from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES

    for candidate in [folder / f for f in _PREFERRED_FILES] + [
        f for ext in _EXT_PRIORITY for f in sorted(folder.glob(f"*{ext}"))
    ]:
        if candidate.is_file():
            return candidate
    raise UserError(
        f"model folder {folder} holds no weights file ({', '.join(_EXT_PRIORITY)}): it needs one beside config.json"
    )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Teacher(nn.Module):
    """A frozen timm model returning ``{"logits": (B, C), "features": (B, D)}`` (what it has).

    ``tokens`` (B, T, D) exist for every model but are computed only when asked
    for (``teacher(x, outputs=...)``): the default outputs leave them out.
    """

    def __init__(self, spec: TeacherSpec, model: nn.Module, weights: str, model_args: dict | None = None):
        super().__init__()
        self.spec, self.model, self.weights = spec, model.requires_grad_(False), weights
        self.model_args = dict(
            model_args or {}
        )  # the timm.create_model arguments given (--model-arg), over the spec's own
        self.eval()
        cfg = model.pretrained_cfg or {}
        self.input_size = spec.input_size or cfg.get("input_size", (3, 224, 224))[-1]
        self.mean = tuple(spec.mean or cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(spec.std or cfg.get("std", IMAGENET_STD))
        self.interpolation = spec.interpolation or cfg.get("interpolation", "bicubic")
        self.num_classes = model.num_classes if "logits" in spec.outputs else 0
        self.default_outputs = spec.outputs if self.num_classes else tuple(o for o in spec.outputs if o != "logits")
        self.outputs = tuple(dict.fromkeys(self.default_outputs + ("tokens",)))  # everything that exists
        self.feature_dim = model.num_features
        self._token_shape = None

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch norm statistics never move

    @torch.no_grad()
    def forward(self, x: torch.Tensor, outputs=None) -> dict[str, torch.Tensor]:
        """The outputs named in ``outputs`` (default: ``default_outputs``) from one ``forward_features`` pass."""
        outputs = self.default_outputs if outputs is None else tuple(outputs)
        f = self.model.forward_features(x)
        out = {}
        if "features" in outputs:
            out["features"] = self.model.forward_head(f, pre_logits=True)
        if "logits" in outputs and "logits" in self.outputs:
            out["logits"] = self.model.forward_head(f)
        if "tokens" in outputs:
            out["tokens"] = self._tokens(f)
        return out

    def _tokens(self, f: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens from ``forward_features``: CLS then patches for ViTs, H*W positions for CNNs."""
        if f.ndim == 4:
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # swin, mambaout: (B, H, W, C)
                return f.flatten(1, 2)
            return f.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C), row-major positions
        prefix = getattr(self.model, "num_prefix_tokens", 0)
        if prefix and getattr(self.model, "cls_token", None) is not None:
            # timm orders the prefix [CLS, registers...]; registers carry no image content, so drop them.
            return torch.cat([f[:, :1], f[:, prefix:]], dim=1)
        return f[:, prefix:]

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, D) of ``tokens`` at the teacher's input size, from one dry forward of a single zero image."""
        if self._token_shape is None:
            p = next(self.model.parameters())
            x = torch.zeros(1, 3, self.input_size, self.input_size, device=p.device, dtype=p.dtype)
            self._token_shape = tuple(self(x, outputs=("tokens",))["tokens"].shape[1:])
        return self._token_shape

    @property
    def token_prefix(self) -> int:
        """Leading non-patch tokens kept in ``tokens``: 1 (CLS) for ViTs with a class token, else 0."""
        return token_prefix(self.model)


def _classes_in(shapes: dict[str, tuple[int, ...]], model_name: str) -> int:
    """The classifier width in a state dict's tensor shapes (0 when it has no classifier)."""
    classifier = getattr(timm.models.get_pretrained_cfg(model_name), "classifier", None) or "head"
    for key in (f"{classifier}.weight", f"{classifier}.fc.weight", "fc.weight", "head.weight", "head.fc.weight"):
        if key in shapes:
            return int(shapes[key][0])
    return 0


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weights file: a safetensors file's header alone, else the checkpoint read as timm reads it."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k.removeprefix("module."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise UserError(
                f"cannot read weights file {path} ({type(e).__name__}: {e}); it must be safetensors or a torch checkpoint"
            ) from e
    return {k: tuple(getattr(v, "shape", ())) for k, v in _read_state_dict(path).items()}


def _read_state_dict(path: Path) -> dict:
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]  # torch's refusal of a pickled object runs to ten lines
        raise UserError(
            f"cannot read weights file {path} ({type(e).__name__}: {first}); it must be safetensors or a torch checkpoint"
        ) from e
    stray = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if stray is not None:
        raise UserError(
            f"weights file {path}: '{stray}' holds a {type(state[stray]).__name__}, not a tensor; a weights file maps names to tensors"
        )
    return state


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):  # the hub's own switch
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def build_teacher(
    name: str,
    *,
    weights: str | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
    seed: int = 0,
    input_size: int | None = None,
    load: bool = True,
    model_args: dict | None = None,
) -> Teacher:
    """Load a frozen teacher.

    name: a short name, any timm model, or a timm model folder (``local-dir:PATH``, ``hf-hub:REPO``), whose
    config.json gives the architecture, model arguments, input size, normalisation and class count and whose
    weights file is identified by its sha256, as a --weights file is.
    weights: a local safetensors file or torch checkpoint; the class count comes from it.
    random_init: no weights, initialised from ``seed`` (tests); ``num_classes`` from the dataset.
    neither: the hub weights of the spec's timm model (the usual hub cache), failing fast offline.
    input_size: render size; ``None`` keeps the teacher's own.
    load: ``False`` describes the teacher without its weights, for a process that only needs its record (a Ray
    driver): the model is built on torch's "meta" device (shapes, no memory), its class count read from the weights
    file's header or timm's pretrained config; the weights are identified as when loaded (a file's sha256).
    model_args: extra ``timm.create_model`` arguments (``--model-arg``), over the spec's own.
    """
    model_args = _checked_model_args(model_args)
    folder = model_folder(name, weights=not (random_init or weights))
    if folder is not None and weights:
        raise UserError(
            f"teacher '{name}' is a model folder with weights of its own: leave --weights out, "
            "or name its architecture instead (--teacher MODEL --weights FILE)"
        )
    spec = _sized(_folder_spec(name, folder) if folder is not None else resolve_teacher(name), input_size, model_args)
    kwargs = dict(spec.kwargs)
    if model_args:  # a misspelt or misfit argument is one line now, not a traceback from the model's builder
        _check_builds(name, spec, model_args)
    if random_init:
        return _random_teacher(spec, num_classes if "logits" in spec.outputs else 0, seed, kwargs, load, model_args)
    if folder is not None:
        path = weights_in_folder(folder)
        return Teacher(spec, _from_file(spec, path, kwargs, load), f"sha256:{file_sha256(path)}", model_args)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise UserError(
                f"weights file {path} not found: pass an existing safetensors file or torch checkpoint to --weights"
            )
        spec = _with_file_metadata(spec, path, input_size)
        return Teacher(spec, _from_file(spec, path, kwargs, load), f"sha256:{file_sha256(path)}", model_args)
    return _hub_teacher(name, spec, kwargs, load, model_args)


def _random_teacher(
    spec: TeacherSpec, num_classes: int, seed: int, kwargs: dict, load: bool, model_args: dict
) -> Teacher:
    """Random weights from ``seed`` (tests): the same seed builds the same teacher."""
    if not load:
        return Teacher(
            spec,
            _shapes_only(spec.timm_name, num_classes=num_classes, **kwargs),
            f"random-init:seed={seed}",
            model_args,
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)
    return Teacher(spec, model, f"random-init:seed={seed}", model_args)


def _hub_teacher(name: str, spec: TeacherSpec, kwargs: dict, load: bool, model_args: dict) -> Teacher:
    """timm's hub weights of the spec's model: from the hub, or offline from the hub cache (failing fast without them)."""
    if _hub_reachable():
        if not load:  # the hub weights have the classes of timm's pretrained config, the default of create_model
            return Teacher(spec, _shapes_only(spec.timm_name, **kwargs), f"hub:{spec.timm_name}", model_args)
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as e:
            raise UserError(f"cannot load hub weights for {spec.timm_name}: {e}; pass --weights FILE instead") from e
        return Teacher(spec, model, f"hub:{spec.timm_name}", model_args)
    # Offline, timm would retry the hub for most of a minute: look in the hub cache ourselves.
    cached = _cached_hub_file(spec.timm_name)
    if cached is None:
        raise UserError(
            f"teacher '{name}' needs the hub weights of {spec.timm_name}, which are not in the local hub cache, "
            "and the hub cannot be reached: download them elsewhere and pass --weights FILE (safetensors or torch checkpoint)"
        )
    return Teacher(spec, _from_file(spec, Path(cached), kwargs, load), f"hub:{spec.timm_name}", model_args)


RUN_ARGS = (
    "num_classes",
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
)  # build_teacher's to set


def _checked_model_args(model_args: dict | None) -> dict:
    model_args = dict(model_args or {})
    taken = [k for k in model_args if k in RUN_ARGS]
    if taken:
        raise UserError(
            f"--model-arg {taken[0]}: the teacher's class count and weights come from its weights (or --random-init and the data), "
            "not from a model argument; drop it"
        )
    return model_args


def _sized(spec: TeacherSpec, input_size: int | None, model_args: dict) -> TeacherSpec:
    """The spec at render size ``input_size`` (None: its own) with ``model_args`` over its own arguments."""
    if input_size is not None:
        spec = replace(spec, input_size=input_size)
        if "img_size" in spec.kwargs:  # ViTs built for a fixed size (DINOv2) follow the render size
            spec = replace(spec, kwargs={**spec.kwargs, "img_size": input_size})
    if model_args:
        spec = replace(spec, kwargs={**spec.kwargs, **model_args})
        size = model_args.get("img_size")
        if (
            input_size is None and size is not None
        ):  # a model built for another size (img_size=64) is rendered at that size
            spec = replace(spec, input_size=size[-1] if isinstance(size, (list, tuple)) else size)
    return spec


def default_teacher_id(name: str) -> str:
    """The id a teacher gets in a store when none is given: its name, as a plain file name (a local folder: its own name)."""
    source, _, path = name.partition(":")
    if source == "local-dir" and Path(path).name not in ("", ".", ".."):
        name = Path(path).name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _shapes_only(timm_name: str, **kwargs) -> nn.Module:
    """The model on torch's "meta" device: every shape (classes, width, tokens through a dry forward), no weights."""
    with torch.device("meta"):
        return timm.create_model(timm_name, pretrained=False, **kwargs)


def _check_builds(name: str, spec: TeacherSpec, model_args: dict) -> None:
    """Refuse, in one line, model arguments the model's builder does not take (built on the meta device: no memory, no time)."""
    try:
        _shapes_only(spec.timm_name, num_classes=0, **spec.kwargs)
    except (
        TypeError,
        ValueError,
        AssertionError,
        RuntimeError,
        IndexError,
        KeyError,
    ) as e:  # how model builders refuse arguments
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        given = ", ".join(f"{k}={v!r}" for k, v in model_args.items())
        raise UserError(
            f"teacher '{name}' (timm model {spec.timm_name}) cannot be built with {given}: {words[:200]}; fix or drop the --model-arg"
        ) from None


def _from_file(spec: TeacherSpec, path: Path, kwargs: dict, load: bool) -> nn.Module:
    if load:
        return _load_file(spec, path, kwargs)
    nc = spec.num_classes if spec.num_classes is not None else _classes_in(file_shapes(path), spec.timm_name)
    return _shapes_only(spec.timm_name, num_classes=nc, **kwargs)


def _with_file_metadata(spec: TeacherSpec, path: Path, input_size: int | None) -> TeacherSpec:
    """Input size and normalisation recorded in a safetensors file (as `pipeline train` writes them).

    They describe how these weights were trained, so they win over the spec; an
    explicit ``input_size`` wins over both.
    """
    if path.suffix != ".safetensors":
        return spec
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return spec  # unreadable files get their clear error from the loader

    def read(key: str, ok, expected: str):
        try:
            value = json.loads(meta[key])
        except ValueError:
            value = meta[key]
        if not ok(value):
            raise UserError(
                f"weights file {path}: metadata '{key}' is {meta[key]!r:.40}, expected {expected}; fix or drop it"
            )
        return value

    def rgb(v) -> bool:
        return (
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        )

    size = (
        read(
            "input_size",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE,
            f"a whole number of pixels in [1, {MAX_SIZE}]",
        )
        if "input_size" in meta
        else None
    )
    return replace(
        spec,
        input_size=input_size or size or spec.input_size,
        mean=tuple(read("mean", rgb, "a list of 3 numbers")) if "mean" in meta else spec.mean,
        std=tuple(read("std", rgb, "a list of 3 numbers")) if "std" in meta else spec.std,
    )


def hub_weights_reachable(timm_name: str) -> bool:
    """Whether timm's pretrained weights of ``timm_name`` can be had now: in the hub cache, or from the hub (quickly checked)."""
    return _cached_hub_file(timm_name) is not None or _hub_reachable()


def _cached_hub_file(timm_name: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo = getattr(cfg, "hf_hub_id", None)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = repo and try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def _load_file(spec: TeacherSpec, path: Path, kwargs: dict) -> nn.Module:
    """A timm model with weights from a local file; its class count comes from the file."""
    state_dict = _read_state_dict(path)
    nc = (
        spec.num_classes
        if spec.num_classes is not None
        else _classes_in({k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}, spec.timm_name)
    )
    del state_dict
    try:
        # Through timm's loader so each model's checkpoint filter runs (position
        # embeddings resampled to img_size, original checkpoint formats converted).
        return timm.create_model(
            spec.timm_name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path), "num_classes": nc},
            num_classes=nc,
            **kwargs,
        )
    except Exception as e:
        raise UserError(
            f"weights {path} do not fit teacher '{spec.name}' (timm model {spec.timm_name}): {state_dict_problem(e)}"
        ) from e


def state_dict_problem(e: Exception) -> str:
    """torch's load_state_dict error in one short line: how many keys are missing, unexpected or of another shape, with an example of each."""
    text = str(e).strip()
    if not text.startswith("Error(s) in loading state_dict"):
        return text.splitlines()[0] if text else type(e).__name__

    def keys(label: str) -> list[str]:
        found = re.search(rf"{label} key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)", text, re.S)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
        r"the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        text,
    )
    parts = []
    for label, found in (("missing", keys("Missing")), ("unexpected", keys("Unexpected"))):
        if found:
            parts.append(f"{len(found)} {label} key(s) (e.g. {found[0]})")
    if shapes:
        key, file_shape, model_shape = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (e.g. {key}: {file_shape} in the file, {model_shape} in the model)"
        )
    return "; ".join(parts) or text.splitlines()[0]
