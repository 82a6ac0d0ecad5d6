"""The ``pipeline`` command: demo, prepare, train, extract, verify, inspect, stats, distill, sweep, report.

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

from pipeline.settings import setting_flags
from pipeline.commands.demo import add_demo_parser
from pipeline.commands.distill import add_distill_parser, add_train_parser
from pipeline.commands.extract import add_extract_parser, add_stats_parser, add_verify_parser
from pipeline.runs.resume import CHECKPOINT
from pipeline.commands.inspection import add_inspect_parser
from pipeline.commands.prepare import add_prepare_parser
from pipeline.commands.report import add_report_parser
from pipeline.commands.sweep import add_sweep_parser

log = logging.getLogger("pipeline")

# One builder per command, in the order `pipeline --help` lists them.
PARSERS = (
    add_demo_parser,
    add_prepare_parser,
    add_train_parser,
    add_extract_parser,
    add_verify_parser,
    add_inspect_parser,
    add_stats_parser,
    add_distill_parser,
    add_sweep_parser,
    add_report_parser,
)


class BadArguments(UserError):
    """A flag argparse refused: one line, like any other UserError."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals are a ``BadArguments`` (what is wrong, where help is), not usage text and an exit."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        raise BadArguments(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pipeline", description="Distil students from cached teacher outputs.", allow_abbrev=False
    )
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
    """Every flag whose setting is declared (``setting_flags.declaration``) parses and checks with that declaration."""
    for action in p._actions:
        if action.nargs == 0 or action.choices is not None or action.type not in (None, int, float):
            continue  # switches, choices, and flags with a parser of their own (the settings' fields)
        if setting_flags.declaration(action.dest) is not None:
            action.type = setting_flags.flag_type(action.dest)


def setup_logging(quiet: bool, debug: bool = False) -> None:
    # The root logger passes everything from INFO up, so run logs are complete;
    # only the console obeys --quiet.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr, force=True
    )
    console = logging.getLogger().handlers[0]
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("timm", "ray", "urllib3", "filelock", "botocore", "aiobotocore", "s3fs", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Library warnings (torch, numpy, zarr) go to the run log as one line each, and to the console only with --debug;
    # so does asyncio's "Unclosed client session" of an s3fs session that the garbage collector closes (aiohttp's).
    warnings.showwarning = _log_warning
    if not debug:
        console.addFilter(lambda record: record.name not in ("py.warnings", "asyncio"))


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines()[0] if str(message).strip() else ""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, filename, lineno)


def _again(args) -> str:
    """What a stopped run keeps, and how to go on: a run without checkpoints starts over."""
    if args.command == "extract":
        return "committed units are kept; run the same command again to resume"
    if args.command == "prepare":
        return "finished shards are kept; run the same command again to make the rest"
    if args.command in ("distill", "train"):
        if getattr(args, "ray_workers", 0) or (Path(args.out) / CHECKPOINT).is_file():
            return "the checkpoint of the last finished epoch is kept; run the same command with --resume to continue"
        return "no epoch had finished, so there is no checkpoint; run the command again to start over"
    if args.command == "sweep":
        return "finished trials are kept and unfinished ones keep their last checkpoint; run the same command to resume the sweep"
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
        _last_line(
            f"error: {(e.strerror or os.strerror(e.errno)).lower()}{where}: free space or fix permissions; {_again(args)}"
        )
        return 2
    log.info("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
