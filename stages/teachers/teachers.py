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
import logging
import re
from dataclasses import replace
from pathlib import Path

import timm
import torch
from torch import nn

from storage import UserError
from storage.registry import Registry

from ..model_outputs import token_prefix
from .model_folders import cached_hub_file, hub_reachable, model_folder, weights_in_folder
from .teacher_spec import TeacherSpec
from .weight_files import classes_in, file_sha256, file_shapes, load_file, with_file_metadata


log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        # the class count is build_teacher's to pass
        kwargs={k: v for k, v in model_args.items() if k != "num_classes"},
        interpolation=cfg.get("interpolation"),
        num_classes=cfg.get("num_classes"),
    )


class Teacher(nn.Module):
    """A frozen timm model returning ``{"logits": (B, C), "features": (B, D)}`` (what it has).

    ``tokens`` (B, T, D) exist for every model but are computed only when asked
    for (``teacher(x, outputs=...)``): the default outputs leave them out.
    """

    def __init__(self, spec: TeacherSpec, model: nn.Module, weights: str, model_args: dict | None = None):
        super().__init__()
        self.spec, self.model, self.weights = spec, model.requires_grad_(False), weights
        # the timm.create_model arguments given (--model-arg), over the spec's own
        self.model_args = dict(model_args or {})
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
        spec = with_file_metadata(spec, path, input_size)
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
    if hub_reachable():
        if not load:  # the hub weights have the classes of timm's pretrained config, the default of create_model
            return Teacher(spec, _shapes_only(spec.timm_name, **kwargs), f"hub:{spec.timm_name}", model_args)
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except Exception as e:
            raise UserError(f"cannot load hub weights for {spec.timm_name}: {e}; pass --weights FILE instead") from e
        return Teacher(spec, model, f"hub:{spec.timm_name}", model_args)
    # Offline, timm would retry the hub for most of a minute: look in the hub cache ourselves.
    cached = cached_hub_file(spec.timm_name)
    if cached is None:
        raise UserError(
            f"teacher '{name}' needs the hub weights of {spec.timm_name}, which are not in the local hub cache, "
            "and the hub cannot be reached: download them elsewhere and pass --weights FILE (safetensors or torch checkpoint)"
        )
    return Teacher(spec, _from_file(spec, Path(cached), kwargs, load), f"hub:{spec.timm_name}", model_args)


# build_teacher's to set
RUN_ARGS = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


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
        # a model built for another size (img_size=64) is rendered at that size
        if input_size is None and size is not None:
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
        return load_file(spec, path, kwargs)
    nc = spec.num_classes if spec.num_classes is not None else classes_in(file_shapes(path), spec.timm_name)
    return _shapes_only(spec.timm_name, num_classes=nc, **kwargs)
