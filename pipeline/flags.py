"""Flag groups that several commands share, and how each is read back: views, teacher weights, the device."""

from __future__ import annotations

import argparse
import re

import torch

from stages.data.datasets import ImageDataset
from stages.data.views import ViewRecipe
from stages.teachers.teachers import build_teacher
from storage import UserError

from . import config


RAY_ADDRESS_HELP = "Ray cluster to join, HOST:PORT, ray://HOST:PORT, or auto for the one `ray start` runs on this machine"


def view_flags(p: argparse.ArgumentParser) -> None:
    d = ViewRecipe()
    g = p.add_argument_group("views (fixed when a store is created; an existing store keeps its own)")
    g.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help=f"RandomResizedCrop area range (default: {d.scale[0]} {d.scale[1]})")
    g.add_argument("--ratio", type=float, nargs=2, metavar=("MIN", "MAX"), help=f"RandomResizedCrop aspect range (default: {d.ratio[0]:.4g} {d.ratio[1]:.4g})")
    g.add_argument("--hflip", type=float, help=f"horizontal flip probability (default: {d.hflip})")
    g.add_argument("--eval-crop", type=float, help=f"centre-crop fraction of evaluation views (default: {d.eval_crop})")
    g.add_argument("--plan-seed", type=int, help="seed of the view plan (default: 0)")

def view_recipe(args, base: ViewRecipe | None = None) -> ViewRecipe:
    """View flags over the ``views:`` section of --config over ``base`` (a store's recipe, or the defaults)."""
    file = config.load_yaml(args.config).get("views", {}) if args.config else {}
    flags = {"scale": args.scale, "ratio": args.ratio, "hflip": args.hflip, "eval_crop": args.eval_crop}
    return config.build(ViewRecipe, config.merge((base or ViewRecipe()).to_dict(), file, flags), args.config or "view flags")

def teacher_flags(g, seed_flag: str) -> None:
    g.add_argument("--weights", help="teacher weights: a safetensors file or torch checkpoint (default: the hub weights of the teacher)")
    g.add_argument("--random-init", action="store_true", help=f"random teacher weights from {seed_flag}, for tests (default: off)")
    g.add_argument(seed_flag, dest="teacher_seed", type=int, default=0, help="seed of a --random-init teacher; the same seed builds the same teacher (default: 0)")

def teacher_from_flags(args, dataset: ImageDataset, input_size: int | None):
    """The teacher named by --teacher, --weights / --random-init and its seed flag."""
    return build_teacher(
        args.teacher,
        weights=args.weights,
        random_init=args.random_init,
        num_classes=dataset.num_classes,
        seed=args.teacher_seed,
        input_size=input_size,
    )

def local_device(flag: str | None) -> str:
    """--device, else cuda when a GPU is visible, else cpu."""
    device = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is visible here: use --device cpu")
    index = device.partition(":")[2]
    if device.startswith("cuda") and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine shows {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this machine has no Apple GPU: use --device cpu")
    return device

def teacher_id_of(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
