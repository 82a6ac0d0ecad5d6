"""The ``pipeline`` command: demo, train, extract, verify, stats, distill.

Each command resolves its settings (flag > --config file > recipe > default),
saves them beside its output with a log file, and calls into ``stages``. A
``UserError`` ends the run with one line on stderr and exit status 2; the
traceback appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

from storage import UserError

from . import commands, settings_check
from .resume import CHECKPOINT
from .demo import add_demo_parser
from .inspection import add_inspect_parser
from .report import add_report_parser
from .sweep import add_sweep_parser

log = logging.getLogger("pipeline")

RAY_ADDRESS_HELP = "Ray cluster to join, HOST:PORT, ray://HOST:PORT, or auto for the one `ray start` runs on this machine"

TRAIN_DEFAULTS = commands.TrainSettings()


def _training_flags(p: argparse.ArgumentParser, *, epochs: int | None = None) -> None:
    d = TRAIN_DEFAULTS
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"training epochs (default: {epochs or d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"samples per optimiser step per worker, as timm's flag (with --workers N the global batch is N times it); a last partial batch is dropped (default: a --config recipe's global_batch split over the workers, else {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"AdamW peak learning rate, cosine decay (default: {d.lr})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default: {d.weight_decay})")
    g.add_argument("--warmup-epochs", type=float, help=f"linear learning-rate warm-up (default: {d.warmup_epochs})")
    g.add_argument("--seed", type=int, help=f"seed of the student's initialisation and data order (default: {d.seed})")
    g.add_argument("--size", type=int, help="input size of the trained model (default: the store's view size, else the model's own)")
    g.add_argument(
        "--label-fraction",
        type=float,
        help="share of training samples whose label the student may use, stratified per class; the others are "
        f"supervised by the teacher alone, 0 trains from the cache only (default: {d.label_fraction})",
    )
    g.add_argument("--loader-workers", type=int, help=f"loader processes rendering views (default: {d.loader_workers}, render in the main process)")
    g.add_argument("--config", help="YAML file of settings (any TrainSettings field, method_args); flags override it")
    g = p.add_argument_group("speed (what timm's train.py gives a GPU user)")
    g.add_argument("--device", help="where the student trains, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="autocast of each step: bf16, or fp16 with a gradient scaler (CUDA only) (default: off, float32)")
    g.add_argument("--channels-last", action="store_true", default=None, help="NHWC student and inputs, faster convolutions on GPUs (default: off)")
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM (default: no clipping)")
    g.add_argument("--model-ema", type=float, metavar="DECAY", help="also keep an EMA of the student (timm ModelEmaV3, e.g. 0.9998), evaluated each epoch and saved beside it (default: off)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the student (default: off)")
    g.add_argument("--out", required=True, help="run directory: weights, metrics.jsonl, config.yaml, run.log, checkpoint.pt (ray/ checkpoints instead with --workers N)")
    g.add_argument("--resume", action="store_true", help="continue the run under --out from its last checkpoint (OUT/checkpoint.pt, or Ray Train's with --workers N), e.g. with more --epochs (default: off, start afresh)")


def _view_flags(p: argparse.ArgumentParser) -> None:
    d = commands.ViewRecipe()
    g = p.add_argument_group("views (fixed when a store is created; an existing store keeps its own)")
    g.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), help=f"RandomResizedCrop area range (default: {d.scale[0]} {d.scale[1]})")
    g.add_argument("--ratio", type=float, nargs=2, metavar=("MIN", "MAX"), help=f"RandomResizedCrop aspect range (default: {d.ratio[0]:.4g} {d.ratio[1]:.4g})")
    g.add_argument("--hflip", type=float, help=f"horizontal flip probability (default: {d.hflip})")
    g.add_argument("--eval-crop", type=float, help=f"centre-crop fraction of evaluation views (default: {d.eval_crop})")
    g.add_argument("--plan-seed", type=int, help="seed of the view plan (default: 0)")


def _teacher_flags(g, seed_flag: str) -> None:
    g.add_argument("--weights", help="teacher weights: a safetensors file or torch checkpoint (default: the hub weights of the teacher)")
    g.add_argument("--random-init", action="store_true", help=f"random teacher weights from {seed_flag}, for tests (default: off)")
    g.add_argument(seed_flag, dest="teacher_seed", type=int, default=0, help="seed of a --random-init teacher; the same seed builds the same teacher (default: 0)")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="supervised training of any timm model (for example to fit a teacher)")
    p.add_argument("--data", required=True, help="training data: digits, folder:PATH, fake:N or wds:PATTERN (tar shards, local or s3://..., e.g. train-{0000..0099}.tar)")
    p.add_argument("--val-data", help="validation data for folder and wds datasets: folder:PATH with the same class folders, or wds:PATTERN (default: digits and fake have their own split; none for folders and shards)")
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra timm.create_model argument, YAML value (repeatable; default: none)")
    p.add_argument(
        "--method", choices=commands.TEACHERLESS_METHODS,
        help="ce: labels only; gpd: the model trained beside its widened dynamic teacher, GPD's from-scratch mode (default: ce)",
    )
    _view_flags(p)
    _training_flags(p)
    p.set_defaults(func=commands.train_command)


def add_extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="stage one: run a frozen teacher over recorded views into a store")
    p.add_argument("--data", required=True, help="training data: digits, folder:PATH, fake:N or wds:PATTERN (tar shards, local or s3://..., e.g. train-{0000..0099}.tar)")
    p.add_argument("--teacher", required=True, help="short name (dinov2_s/b/l/g[_reg], beitv2_b/l, resnet152) or any timm model")
    _teacher_flags(p, "--seed")
    p.add_argument("--teacher-id", help="name of the teacher inside the store (default: --teacher)")
    p.add_argument("--store", required=True, help="store directory or fsspec URL (s3://bucket/path); created on first use, resumed or extended later")
    p.add_argument("--views", type=int, required=True, help="views per sample; more than the store has appends views")
    p.add_argument("--size", type=int, help="render size of the teacher's views (default: the teacher's input size)")
    p.add_argument("--block", type=int, help="samples per shard, the unit of work, fixed when a store is made (default: 1024 for a new store; an existing one keeps its own)")
    _output_flags(p)
    p.add_argument("--batch-size", type=int, default=64, help="teacher batch size (default: 64)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32",
        help="the teacher's arithmetic: bf16 autocast is the fast choice on GPUs that have it; recorded in teacher.json, "
        "and every extraction into one teacher id must use the same (default: fp32)",
    )
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering views ahead of the teacher (per Ray actor with --actors) (default: 0)")
    p.add_argument("--device", help="where the teacher runs, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu; on Ray: cuda for GPU actors, else cpu)")
    _extract_ray_flags(p)
    p.add_argument("--repair", action="store_true", help="first check every committed unit and rewrite the damaged ones (default: off)")
    p.add_argument("--config", help="YAML recipe; its views: section sets the view plan, flags override it (default: none)")
    _view_flags(p)
    p.set_defaults(func=commands.extract_command)


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what is stored")
    g.add_argument("--logits", choices=("topk", "full"), default="topk", help="store top-k logits or all of them (default: topk)")
    g.add_argument("--topk", type=int, help="k for --logits topk, at most the teacher's class count (default: 10, or every class when fewer)")
    g.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored float type; float32 stores are exact (default: float16)")
    g.add_argument("--format", choices=("zarr", "wds"), default="zarr", help="how teacher outputs are stored: zarr arrays, or wds: one webdataset tar per (view, block) unit, for streaming; fixed per teacher id (default: zarr)")
    g.add_argument(
        "--feature-dtype",
        choices=("float16", "float32", "int8"),
        help="stored type of features and tokens; int8 keeps a float32 scale per vector, about 1 byte per value (default: the --dtype value)",
    )
    g.add_argument(
        "--outputs",
        help="comma-separated outputs to store: logits, features, tokens (CLS and patch tokens, large: the cost is logged first) "
        "(default: all the teacher has except tokens)",
    )


def _extract_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (extraction spread over actors, each holding one teacher and taking (view, block) units from a queue)")
    g.add_argument(
        "--actors", type=int,
        help="Ray actors; 0 runs in this process without Ray (default: 0, but with --ray-address or RAY_ADDRESS one per GPU, or one per node on a CPU-only cluster)",
    )
    g.add_argument(
        "--gpus-per-worker", type=float,
        help="GPUs each actor holds; 0 makes CPU actors (default: 0 with --device cpu, else 1 when --device cuda is given or the cluster has GPUs, else 0)",
    )
    g.add_argument(
        "--ray-address", metavar="ADDR",
        help=f"{RAY_ADDRESS_HELP}; setting it (or RAY_ADDRESS) runs on Ray (default: RAY_ADDRESS, else a local Ray instance started for --actors N)",
    )


def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check a store: unit counts, checksums against commit records, a sample of replayed views")
    p.add_argument("store", metavar="STORE", help="the store (a directory or URL such as s3://bucket/path)")
    p.add_argument("--teacher", help="teacher id to check (default: every teacher, and the plan)")
    p.add_argument("--replay", type=float, default=0.01, help="share of views re-rendered and compared with their fingerprints, 0 to skip (default: 0.01)")
    p.add_argument("--data", help="the training data, when it moved since extraction (default: the store's)")
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering replayed views (default: 0)")
    p.set_defaults(func=commands.verify_command)


def add_stats_parser(sub) -> None:
    p = sub.add_parser("stats", help="class means and feature moments of a teacher, reduced from its cache (KD++ needs them)")
    p.add_argument("--store", required=True, help="the store made by `pipeline extract`")
    p.add_argument("--teacher", help="teacher id in the store (default: every teacher)")
    p.add_argument("--data", help="the training data, when it moved since extraction (default: the store's)")
    p.set_defaults(func=commands.stats_command)


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="stage two: train a student from a store's cached teacher outputs")
    p.add_argument("--from-cache", required=True, metavar="STORE", help="the store made by `pipeline extract`")
    p.add_argument("--teacher", help="teacher id in the store, or several as a,b to average their probabilities (default: its only teacher); with --online, the teacher to run")
    p.add_argument("--teacher-weights", help="weights of the teachers in --teacher a,b, e.g. 0.7,0.3 (default: equal)")
    p.add_argument("--online", action="store_true", help="run the teacher live on the same replayed views instead of reading the cache (default: off)")
    _teacher_flags(p, "--teacher-seed")
    p.add_argument("--teacher-size", type=int, help="render size of the live teacher (default: the store's view size)")
    p.add_argument("--student", help=f"timm model name of the student (default: {TRAIN_DEFAULTS.student})")
    p.add_argument("--student-arg", action="append", metavar="KEY=VALUE", help="extra timm.create_model argument, YAML value, e.g. channels=[8,16,32,64] (repeatable; default: none)")
    p.add_argument("--method", help=f"distillation method (default: {TRAIN_DEFAULTS.method}); its recipe is configs/methods/NAME.yaml")
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="method setting, e.g. temperature=4 (repeatable; default: the method's recipe in configs/methods/)")
    p.add_argument("--data", help="training data, when it moved since extraction (default: the store's; must match its fingerprint)")
    p.add_argument("--val-data", help="validation data for folder and wds datasets: folder:PATH with the same class folders, or wds:PATTERN (default: digits and fake have their own split; none for folders and shards)")
    p.add_argument("--verify", choices=("all", "sample", "none"), help="replayed views checked against the stored fingerprints (default: sample, about 1 in 100)")
    _training_flags(p)
    _distill_ray_flags(p)
    p.set_defaults(func=commands.distill_command)


def _distill_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Train (DDP: gloo on CPUs, NCCL on GPUs)")
    g.add_argument("--workers", type=int, default=0, help="Ray Train workers, each training on its own part of the store; 0 trains in this process without Ray (default: 0)")
    g.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs for each Ray Train worker; 0 trains on CPUs with gloo, 1 or more on CUDA with NCCL (default: 0)")
    g.add_argument("--ray-address", metavar="ADDR", help=f"{RAY_ADDRESS_HELP} (default: RAY_ADDRESS, else a local Ray instance)")
    g.add_argument("--max-failures", type=int, default=3, help="times a run restarts from its last checkpoint after a worker fails (default: 3)")
    g.add_argument(
        "--checkpoints", metavar="DIR_OR_URL",
        help="where Ray Train keeps a checkpoint per epoch: a directory every node mounts, or a URL such as s3://bucket/runs/a (default: OUT/ray)",
    )


# One builder per command, in the order `pipeline --help` lists them.
PARSERS = (
    add_demo_parser, add_train_parser, add_extract_parser, add_verify_parser, add_inspect_parser, add_stats_parser, add_distill_parser,
    add_sweep_parser, add_report_parser,
)


class BadArguments(UserError):
    """A flag argparse refused: one line, like any other UserError."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals are a ``BadArguments`` (what is wrong, where help is), not usage text and an exit."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        raise BadArguments(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pipeline", description="Distil students from cached teacher outputs.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors (default: one line)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only (default: progress and results)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    for command in sub.choices.values():
        _declared_types(command)
        command.allow_abbrev = False  # `--epoch 3` is a typo, not --epochs 3 (argparse reads this when parsing)
    return parser


def _declared_types(p: argparse.ArgumentParser) -> None:
    """Every flag whose setting is declared in ``settings_check`` parses and checks with that declaration."""
    for action in p._actions:
        if action.nargs == 0 or action.choices is not None or action.type not in (None, int, float):
            continue  # switches, choices, and flags with a parser of their own
        if any(action.dest in table for table in (settings_check.FLAGS, settings_check.TRAIN, settings_check.VIEWS)):
            action.type = settings_check.flag(action.dest)


def setup_logging(quiet: bool, debug: bool = False) -> None:
    # The root logger passes everything from INFO up, so run logs are complete;
    # only the console obeys --quiet.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    console = logging.getLogger().handlers[0]
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("timm", "ray", "urllib3", "filelock", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Library warnings (torch, numpy, zarr) go to the run log as one line each, and to the console only with --debug.
    warnings.showwarning = _log_warning
    if not debug:
        console.addFilter(lambda record: record.name != "py.warnings")


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines()[0] if str(message).strip() else ""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, filename, lineno)


def _again(args) -> str:
    """What a stopped run keeps, and how to go on: a run without checkpoints starts over."""
    if args.command == "extract":
        return "committed units are kept; run the same command again to resume"
    if args.command in ("distill", "train"):
        if getattr(args, "workers", 0) or (Path(args.out) / CHECKPOINT).is_file():
            return "the checkpoint of the last finished epoch is kept; run the same command with --resume to continue"
        return "no epoch had finished, so there is no checkpoint; run the command again to start over"
    return "run the command again"


def _last_line(text: str) -> None:
    """``text`` as the last line on stderr, alone: log lines still buffered go first, none come after."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)
    logging.getLogger().handlers[0].setLevel(logging.CRITICAL + 1)  # the console says nothing after it


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BadArguments as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    setup_logging(args.quiet, args.debug)
    start = time.perf_counter()
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        _last_line(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        _last_line(f"interrupted: {_again(args)}")
        return 130
    except OSError as e:
        if args.debug or e.errno not in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            raise
        where = f" ({e.filename})" if e.filename else ""
        _last_line(f"error: {(e.strerror or os.strerror(e.errno)).lower()}{where}: free space or fix permissions; {_again(args)}")
        return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
