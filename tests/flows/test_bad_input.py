"""Bad input, one table: every case exits 2 with one line on stderr, and nothing was created or changed.

Each case runs the command line in this process (``pipeline.cli.main``)
without ``--quiet``: a refused setting must fail before any log line, so the
error is the only line. Around every case the test compares, byte for byte,
a store that the case points at, a finished run folder that it points
``--out`` at, and its own scratch folder (where the new stores and run
folders it names would appear). After the table: the interruptions (a kill
while a store is being made, a run refused into a finished folder) and the
messages that used to mislead.
"""

from __future__ import annotations

import errno
import http.server
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.commands import distill as distill_commands
from pipeline.cli import main
from storage import Store

from conftest import BATCH, BLOCK, DATA, SIZE, VIEWS, group_arrays, read_tree

STUDENT = ["--student", "resnet10t", "--student-arg", "channels=[8,16,32,64]"]
E = [
    "extract",
    "--data",
    DATA,
    "--teacher",
    "resnet18",
    "--random-init",
    "--size",
    str(SIZE),
    "--views",
    "1",
    "--block",
    str(BLOCK),
]
EN = [*E, "--store", "{new}"]  # extraction into a store that must not come into being
ES = [*E, "--store", "{store}"]  # extraction into the existing store (teacher t1, 2 views)
D = ["distill", "--from-cache", "{store}", *STUDENT, "--epochs", "1", "--batch-size", "32", "--out", "{run}"]
T = [
    "train",
    "--data",
    DATA,
    "--model",
    "resnet10t",
    "--model-arg",
    "channels=[8,16,32,64]",
    "--epochs",
    "1",
    "--size",
    "32",
    "--batch-size",
    "32",
    "--out",
    "{run}",
]
V = ["verify", "{store}", "--replay", "0"]
# The extraction that made conftest's base_store, through the command line.
SAME_AS_BASE = [
    "extract",
    "--data",
    DATA,
    "--teacher",
    "resnet18",
    "--random-init",
    "--teacher-seed",
    "0",
    "--teacher-id",
    "t1",
    "--size",
    str(SIZE),
    "--views",
    str(VIEWS),
    "--block",
    str(BLOCK),
    "--logits",
    "full",
    "--dtype",
    "float32",
    "--batch-size",
    str(BATCH),
]


@dataclass
class Bad:
    argv: list[str]
    says: str  # a piece of the one line
    yaml: str | None = None  # written to {yaml} first
    env: dict = field(default_factory=dict)  # "{endpoint}": a server that answers 404 to everything


def drop(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def replace(argv: list[str], flag: str, value: str | list[str]) -> list[str]:
    """``argv`` with ``flag``'s value(s) replaced (or appended when absent)."""
    values = value if isinstance(value, list) else [value]
    if flag not in argv:
        return [*argv, flag, *values]
    i = argv.index(flag)
    n = 2 if flag in ("--scale", "--ratio") else 1
    return [*argv[: i + 1], *values, *argv[i + 1 + n :]]


CASES = {
    # -- extract: where the store lives ---------------------------------------------------------------
    "extract-ftp-url": Bad(replace(E, "--store", "ftp://x/s"), "unknown URL scheme"),
    "extract-unknown-scheme": Bad(replace(E, "--store", "foo://b/s"), "unknown URL scheme"),
    "extract-http-url": Bad(replace(E, "--store", "http://127.0.0.1:9/s"), "unknown URL scheme"),
    "extract-chained-url": Bad(replace(E, "--store", "simplecache::s3://bucket/s"), "unknown URL scheme"),
    "extract-invalid-bucket": Bad(replace(E, "--store", "s3://Invalid_Bucket/s"), "not a valid S3 bucket name"),
    "extract-uninstalled-scheme": Bad(replace(E, "--store", "gs://bucket/s"), "pip install gcsfs"),
    "extract-endpoint-404": Bad(
        replace(E, "--store", "s3://teacher-cache/s"),
        "does not exist or these credentials cannot see it",
        env={"AWS_ENDPOINT_URL": "{endpoint}"},
    ),
    # -- extract: sizes and counts ------------------------------------------------------------------------
    "extract-batch-size-0": Bad(replace(EN, "--batch-size", "0"), "--batch-size: must be an integer in [1,"),
    "extract-batch-size-negative": Bad(replace(EN, "--batch-size", "-1"), "--batch-size"),
    "extract-batch-too-big-together": Bad(
        [*replace(EN, "--batch-size", "4096"), "--size", "2048"], "is 192 GiB of float32 input"
    ),
    "extract-block-0": Bad(replace(EN, "--block", "0"), "--block: must be an integer in [1,"),
    "extract-block-huge": Bad(replace(EN, "--block", "1000000000"), "--block"),
    "extract-size-negative": Bad(replace(EN, "--size", "-32"), "--size: must be an integer in [1, 4096]"),
    "extract-size-0": Bad(replace(EN, "--size", "0"), "--size"),
    "extract-size-huge": Bad(replace(EN, "--size", "100000"), "--size"),
    "extract-workers-negative": Bad(replace(EN, "--workers", "-1"), "--workers"),
    "extract-views-0": Bad(replace(EN, "--views", "0"), "--views: must be an integer in [1,"),
    "extract-views-negative": Bad(replace(EN, "--views", "-18"), "--views"),
    "extract-views-word": Bad(replace(EN, "--views", "two"), "--views"),
    "extract-actors-negative": Bad(replace(EN, "--actors", "-1"), "--actors"),
    "extract-gpus-negative": Bad(replace(EN, "--gpus-per-worker", "-1"), "--gpus-per-worker"),
    "extract-topk-0": Bad(replace(EN, "--topk", "0"), "--topk"),
    "extract-topk-above-classes": Bad(replace(EN, "--topk", "11"), "--topk 11 is more than the 10 classes"),
    "extract-device-tpu": Bad(replace(EN, "--device", "tpu"), "--device: must be cpu, cuda, cuda:N or mps"),
    "extract-device-typo": Bad(replace(EN, "--device", "cuda:x"), "--device"),
    "extract-plan-seed-negative": Bad(replace(EN, "--plan-seed", "-1"), "--plan-seed"),
    "extract-teacher-seed-negative": Bad(replace(EN, "--teacher-seed", "-3"), "--teacher-seed"),
    "extract-unknown-choice": Bad(replace(EN, "--logits", "some"), "--logits: invalid choice"),
    "extract-abbreviated-flag": Bad(
        [*drop(EN, "--views"), "--view", "2"], "the following arguments are required: --views"
    ),
    # -- extract: views ---------------------------------------------------------------------------------
    "extract-hflip-2": Bad(replace(EN, "--hflip", "2"), "--hflip: must be a number in [0, 1]"),
    "extract-scale-zero": Bad(replace(EN, "--scale", ["0", "0"]), "--scale"),
    "extract-scale-reversed": Bad(
        replace(EN, "--scale", ["1", "0.5"]), "scale in view flags must be a (min, max) pair with min <= max"
    ),
    "extract-ratio-zero": Bad(replace(EN, "--ratio", ["0", "0"]), "--ratio"),
    "extract-eval-crop-5": Bad(replace(EN, "--eval-crop", "5"), "--eval-crop"),
    "extract-yaml-hflip": Bad([*EN, "--config", "{yaml}"], "hflip in", yaml="views:\n  hflip: 2\n"),
    "extract-yaml-scale-reversed": Bad([*EN, "--config", "{yaml}"], "scale in", yaml="views:\n  scale: [0.9, 0.1]\n"),
    "extract-yaml-word": Bad([*EN, "--config", "{yaml}"], "eval_crop in", yaml="views:\n  eval_crop: most\n"),
    "extract-yaml-unknown": Bad([*EN, "--config", "{yaml}"], "unknown setting(s) bogus", yaml="views:\n  bogus: 1\n"),
    "extract-yaml-python-tag": Bad(
        [*EN, "--config", "{yaml}"], "not valid YAML", yaml="views: !!python/object/apply:os.system [ls]\n"
    ),
    "extract-yaml-missing": Bad([*EN, "--config", "/nonexistent/x.yaml"], "not found"),
    # -- extract: names ---------------------------------------------------------------------------------
    "extract-teacher-id-escapes": Bad([*EN, "--teacher-id", "../../evil"], "--teacher-id: must be a plain name"),
    "extract-teacher-id-empty": Bad([*EN, "--teacher-id", ""], "--teacher-id"),
    "extract-teacher-id-slash": Bad([*EN, "--teacher-id", "a/b"], "--teacher-id"),
    "extract-teacher-id-hidden": Bad([*EN, "--teacher-id", ".t"], "--teacher-id"),
    # -- extract: data ----------------------------------------------------------------------------------
    "extract-fake-0": Bad(replace(EN, "--data", "fake:0"), "N must be an integer in [1,"),
    "extract-fake-negative": Bad(replace(EN, "--data", "fake:-5"), "N must be"),
    "extract-fake-classes-0": Bad(replace(EN, "--data", "fake:8?classes=0"), "classes must be"),
    "extract-fake-size-0": Bad(replace(EN, "--data", "fake:8?size=0"), "size must be"),
    "extract-fake-unknown-option": Bad(replace(EN, "--data", "fake:8?colour=1"), "unknown option colour"),
    "extract-unknown-dataset": Bad(replace(EN, "--data", "imagenet"), "unknown dataset"),
    # -- extract into the existing store ----------------------------------------------------------------
    "extract-other-block": Bad(replace(ES, "--block", "64"), "has blocks of 32 samples"),
    "extract-other-plan-seed": Bad([*ES, "--plan-seed", "7"], "view plan seed 0"),
    "extract-other-views": Bad([*ES, "--hflip", "0.1"], "view plan seed 0"),
    "extract-other-data": Bad(replace(ES, "--data", "fake:64?size=32"), "was made from dataset"),
    "extract-other-teacher-record": Bad([*ES, "--teacher-id", "t1"], "already holds teacher 't1' with other"),
    # -- distill -------------------------------------------------------------------------------------------
    "distill-epochs-0": Bad(replace(D, "--epochs", "0"), "--epochs: must be an integer in [1,"),
    "distill-epochs-negative": Bad(replace(D, "--epochs", "-1"), "--epochs"),
    "distill-batch-size-0": Bad(replace(D, "--batch-size", "0"), "--batch-size"),
    "distill-batch-size-above-data": Bad(replace(D, "--batch-size", "1000"), "larger than a worker's share"),
    "distill-batch-too-big-together": Bad(
        [*replace(D, "--batch-size", "2000"), "--size", "1024"], "lower --batch-size or --size"
    ),
    "distill-loader-workers-negative": Bad([*D, "--workers", "-2"], "--workers"),
    "distill-lr-word": Bad([*D, "--lr", "abc"], "--lr: must be a number > 0"),
    "distill-lr-0": Bad([*D, "--lr", "0"], "--lr"),
    "distill-label-fraction-2": Bad([*D, "--label-fraction", "2"], "--label-fraction: must be a number in [0, 1]"),
    "distill-warmup-negative": Bad([*D, "--warmup-epochs", "-1"], "--warmup-epochs"),
    "distill-size-0": Bad([*D, "--size", "0"], "--size"),
    "distill-size-huge": Bad([*D, "--size", "100000"], "--size"),
    "distill-seed-negative": Bad([*D, "--seed", "-1"], "--seed"),
    "distill-clip-grad-0": Bad([*D, "--clip-grad", "0"], "--clip-grad"),
    "distill-model-ema-above-1": Bad([*D, "--model-ema", "1.5"], "--model-ema"),
    "distill-device-tpu": Bad([*D, "--device", "tpu"], "--device"),
    "distill-unknown-method": Bad([*D, "--method", "kdd"], "unknown method 'kdd'"),
    "distill-method-escapes": Bad([*D, "--method", "../../etc/passwd"], "--method: unknown method '../../etc/passwd'"),
    "distill-method-part-teacher-escapes": Bad([*D, "--method", "kd@../../etc"], "is not a plain name"),
    "distill-method-arg-word": Bad([*D, "--method-arg", "temperature=abc"], "setting temperature"),
    "distill-method-arg-unknown": Bad([*D, "--method-arg", "temprature=4"], "has no setting temprature"),
    "distill-method-arg-temperature-0": Bad([*D, "--method-arg", "temperature=0"], "setting temperature (--method-arg"),
    "distill-method-arg-negative-weight": Bad([*D, "--method-arg", "kd_weight=-1"], "must be a number >= 0"),
    "distill-method-arg-hard-loss": Bad([*D, "--method-arg", "hard_loss=mse"], "must be one of ce, bce"),
    "distill-gpd-ratio-1": Bad([*D, "--method", "gpd", "--method-arg", "ratio=1"], "setting ratio"),
    "distill-gpd-smoothing-1": Bad([*D, "--method", "gpd", "--method-arg", "smoothing=1"], "setting smoothing"),
    "distill-cospress-temperatures": Bad(
        [*D, "--method", "cospress", "--method-arg", "temperatures=[0.1,-1]"], "setting temperatures"
    ),
    "distill-method-arg-no-key": Bad([*D, "--method-arg", "=4"], "--method-arg takes KEY=VALUE"),
    "distill-method-arg-bad-yaml": Bad([*D, "--method-arg", "temperature=[1"], "not valid YAML"),
    "distill-student-arg-unknown": Bad([*D, "--student-arg", "bogus=1"], "bad student settings for resnet10t"),
    "distill-unknown-student": Bad(replace(D, "--student", "resnet7"), "unknown student 'resnet7'"),
    "distill-yaml-epochs-word": Bad([*drop(D, "--epochs"), "--config", "{yaml}"], "epochs in", yaml="epochs: three\n"),
    "distill-yaml-lr-word": Bad([*D, "--config", "{yaml}"], "lr in", yaml="lr: abc\n"),
    "distill-yaml-epochs-fraction": Bad(
        [*drop(D, "--epochs"), "--config", "{yaml}"], "epochs in", yaml="epochs: 1.7\n"
    ),
    "distill-yaml-schedule": Bad([*D, "--config", "{yaml}"], "schedule in", yaml="schedule: linear\n"),
    "distill-yaml-method-args": Bad(
        [*D, "--config", "{yaml}"], "setting kd_weight", yaml="method_args:\n  kd_weight: heavy\n"
    ),
    "distill-yaml-not-a-mapping": Bad([*D, "--config", "{yaml}"], "must hold a mapping", yaml="- epochs\n- 3\n"),
    "distill-yaml-unknown": Bad([*D, "--config", "{yaml}"], "unknown setting(s) epoch", yaml="epoch: 3\n"),
    "distill-out-is-a-file": Bad(replace(D, "--out", "{file}"), "is a file, not a directory"),
    "distill-out-below-a-file": Bad(replace(D, "--out", "{file}/run"), "cannot be made"),
    "distill-store-url": Bad(replace(D, "--from-cache", "ftp://x/s"), "unknown URL scheme"),
    "distill-no-store": Bad(replace(D, "--from-cache", "{new}"), "no store at"),
    "distill-teacher-escapes": Bad([*D, "--teacher-id", "../t1"], "is not a plain name"),
    "distill-unknown-teacher": Bad([*D, "--teacher-id", "t9"], "has no teacher 't9'"),
    "distill-teacher-without-online": Bad(
        [*D, "--teacher", "resnet18"], "add --online, or name the cached teacher with --teacher-id"
    ),
    "distill-teacher-weights-word": Bad(
        [*D, "--teacher-id", "t1", "--teacher-weights", "0.7,abc"], "--teacher-weights"
    ),
    "distill-ray-workers-negative": Bad([*D, "--ray-workers", "-1"], "--ray-workers"),
    "distill-max-failures-negative": Bad([*D, "--max-failures", "-1"], "--max-failures"),
    "distill-gpus-without-workers": Bad([*D, "--gpus-per-worker", "1"], "are for Ray Train runs"),
    "distill-unknown-verify": Bad([*D, "--verify", "most"], "--verify: invalid choice"),
    "distill-other-data": Bad([*D, "--data", "fake:64?size=32"], "was made from dataset"),
    "distill-online-without-teacher": Bad([*D, "--online"], "--online needs --teacher"),
    # -- train -------------------------------------------------------------------------------------------
    "train-epochs-0": Bad(replace(T, "--epochs", "0"), "--epochs"),
    "train-model-arg-unknown": Bad([*T, "--model-arg", "bogus=1"], "bad student settings for resnet10t"),
    "train-unknown-model": Bad(replace(T, "--model", "resnet7"), "unknown student 'resnet7'"),
    "train-batch-size-0": Bad(replace(T, "--batch-size", "0"), "--batch-size"),
    "train-fake-0": Bad(replace(T, "--data", "fake:0"), "N must be"),
    "train-hflip-2": Bad([*T, "--hflip", "2"], "--hflip"),
    "train-size-huge": Bad(replace(T, "--size", "100000"), "--size"),
    "train-out-is-a-file": Bad(replace(T, "--out", "{file}"), "is a file"),
    "train-yaml-epochs-word": Bad([*drop(T, "--epochs"), "--config", "{yaml}"], "epochs in", yaml="epochs: three\n"),
    "train-yaml-views": Bad([*T, "--config", "{yaml}"], "mix_prob in", yaml="views:\n  mix_prob: 3\n"),
    # -- verify, inspect, stats ----------------------------------------------------------------------------
    "verify-replay-negative": Bad(replace(V, "--replay", "-1"), "--replay: must be a number in [0, 1]"),
    "verify-replay-above-1": Bad(replace(V, "--replay", "2"), "--replay"),
    "verify-workers-negative": Bad([*V, "--workers", "-1"], "--workers"),
    "verify-url": Bad(["verify", "foo://b/s"], "unknown URL scheme"),
    "verify-no-store": Bad(["verify", "{new}"], "no store at"),
    "verify-teacher-escapes": Bad([*V, "--teacher-id", "../../t1"], "--teacher-id: must be a plain name"),
    "verify-unknown-teacher": Bad([*V, "--teacher-id", "t9"], "has no teacher 't9'"),
    "inspect-units-0": Bad(["inspect", "{store}", "--units", "0"], "--units"),
    "inspect-topk-0": Bad(["inspect", "{store}", "--topk", "0"], "--topk"),
    "inspect-grid-samples-0": Bad(["inspect", "{store}", "--grid-samples", "0"], "--grid-samples"),
    "inspect-url": Bad(["inspect", "ftp://x/s"], "unknown URL scheme"),
    "inspect-teacher-escapes": Bad(
        ["inspect", "{store}", "--teacher-id", "../x"], "--teacher-id: must be a plain name"
    ),
    "inspect-temperature-huge": Bad(
        ["inspect", "{store}", "--temperature", "1e6"], "--temperature must be a number in [0.001, 1000]"
    ),
    "inspect-temperature-tiny": Bad(
        ["inspect", "{store}", "--temperature", "1,1e-300"], "--temperature must be a number in [0.001, 1000]"
    ),
    "inspect-grid-ids-none-valid": Bad(
        ["inspect", "{store}", "--grid", "{new}.png", "--grid-ids", "1000,2000"],
        "--grid-ids 1000 is not a sample of the store",
    ),
    "report-out-under-a-file": Bad(["report", "{run}", "--out", "{file}/r.png"], "a-file is a file, not a directory"),
    # -- a wrong type anywhere in a recipe, whichever command reads it ------------------------------------
    "extract-yaml-views-number": Bad([*EN, "--config", "{yaml}"], "views in", yaml="views: 3\n"),
    "extract-yaml-size-word": Bad([*EN, "--config", "{yaml}"], "size in", yaml="size: abc\n"),
    "extract-yaml-seed-list": Bad([*EN, "--config", "{yaml}"], "seed in", yaml="seed: [1]\n"),
    "prepare-yaml-size-list": Bad(
        ["prepare", "--data", DATA, "--out", "{new}", "--config", "{yaml}"], "size in", yaml="size: [1, 2]\n"
    ),
    "prepare-yaml-views-list": Bad(
        ["prepare", "--data", DATA, "--out", "{new}", "--config", "{yaml}"], "views in", yaml="views: [1, 2]\n"
    ),
    "distill-yaml-views-scale-word": Bad([*D, "--config", "{yaml}"], "scale in views in", yaml="views: {scale: abc}\n"),
    "distill-yaml-student-kwargs-number": Bad(
        [*D, "--config", "{yaml}"], "student_kwargs in", yaml="student_kwargs: 5\n"
    ),
    "distill-yaml-part-args-number": Bad(
        [*D, "--config", "{yaml}"],
        "the args of part 1 of method must be a mapping",
        yaml="method:\n  - {method: kd, args: 5}\n  - {method: dkd}\n",
    ),
    "distill-yaml-part-teacher-list": Bad(
        [*D, "--config", "{yaml}"],
        "the teacher of part 1 of method must be a teacher id",
        yaml="method:\n  - {method: kd, teacher: [a]}\n",
    ),
    "stats-teacher-escapes": Bad(
        ["stats", "--store", "{store}", "--teacher-id", "../../evil"], "--teacher-id: must be a plain name"
    ),
    "stats-no-store": Bad(["stats", "--store", "{new}"], "no store at"),
    "stats-unknown-teacher": Bad(["stats", "--store", "{store}", "--teacher-id", "t9"], "has no teacher 't9'"),
    "no-such-flag": Bad([*D, "--epochz", "3"], "unrecognized arguments: --epochz 3"),
    "no-such-command": Bad(["extrakt"], "invalid choice: 'extrakt'"),
}


# -- the shared store and the finished run every case points at --------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory, base_store):
    """A copy of base_store, and a finished distill run from it (student, metrics, config, log)."""
    root = tmp_path_factory.mktemp("shared")
    store = root / "store"
    shutil.copytree(base_store, store)
    run = root / "run"
    argv = [a.replace("{store}", str(store)).replace("{run}", str(run)) for a in D]
    assert main(["--quiet", *argv]) == 0
    assert (run / "student.safetensors").is_file() and (run / "config.yaml").is_file()
    return {"store": store, "run": run, "trees": {"store": read_tree(store), "run": read_tree(run)}}


@pytest.fixture(scope="module")
def endpoint_404():
    """An HTTP server on loopback that answers 404 to every request: an S3 endpoint that is not one."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines  # the error alone: no log line before it, no warning, no usage text
    assert lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, shared, tmp_path, capsys, monkeypatch, request):
    bad = CASES[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "a-file").write_text("not a directory\n")
    if bad.yaml is not None:
        (scratch / "c.yaml").write_text(bad.yaml)
    if bad.env:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses file systems; the endpoint comes from the environment
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", **bad.env}.items():
            monkeypatch.setenv(key, value.replace("{endpoint}", request.getfixturevalue("endpoint_404")))
    names = {
        "{store}": shared["store"],
        "{run}": shared["run"],
        "{new}": scratch / "new",
        "{file}": scratch / "a-file",
        "{yaml}": scratch / "c.yaml",
    }

    def fill(arg: str) -> str:
        for key, value in names.items():
            arg = arg.replace(key, str(value))
        return arg

    before = read_tree(scratch)
    capsys.readouterr()
    assert main([fill(a) for a in bad.argv]) == 2
    line = one_line(capsys)
    assert bad.says in line, line
    assert read_tree(scratch) == before  # no new store, no run folder, no evil/ beside them
    assert read_tree(shared["store"]) == shared["trees"]["store"]  # the store is byte-identical
    assert read_tree(shared["run"]) == shared["trees"]["run"]  # the finished run still describes itself
    assert not (shared["store"].parent / "evil").exists()


def test_the_table_is_big_enough():
    assert len(CASES) >= 60
    commands = {bad.argv[0] for bad in CASES.values()}
    assert {"extract", "distill", "train", "verify", "inspect", "stats"} <= commands


def test_every_settings_field_is_declared_once_and_is_a_flag():
    """One declaration per setting: a TrainSettings or ViewRecipe field declares its check and help where it is
    defined, its default passes the check, and the commands get a flag for it with that help and its default."""
    from dataclasses import fields

    from pipeline.cli import build_parser
    from stages.data.views import ViewRecipe
    from stages.settings import declared, default_of
    from stages.training.settings import TrainSettings

    commands = build_parser()._subparsers._group_actions[0].choices
    for cls, command in ((TrainSettings, "distill"), (ViewRecipe, "extract"), (ViewRecipe, "train")):
        missing = {f.name for f in fields(cls)} - set(declared(cls))
        assert not missing, f"{cls.__name__} fields declared without setting(default, check, help): {sorted(missing)}"
        flags = {a.dest: a for a in commands[command]._actions}
        for f in fields(cls):
            declared(cls)[f.name](default_of(f), f.name)  # every default passes its own declaration
            assert f.name in flags, f"pipeline {command} has no flag for {cls.__name__}.{f.name}"
            assert f.metadata["help"] in flags[f.name].help and "(default: " in flags[f.name].help


def test_every_method_setting_is_declared():
    """A new method's numeric or text settings get their range in method_settings.METHOD, and its defaults pass it."""
    import inspect

    from stages.methods import list_methods, method_class
    from stages.methods.method_settings import METHOD

    for name in list_methods():
        params = list(inspect.signature(method_class(name).__init__).parameters.values())[2:]
        for p in params:
            if isinstance(p.default, (int, float, str, list, tuple)):
                assert p.name in METHOD, f"method {name}'s setting {p.name} has no declaration in METHOD"
                METHOD[p.name](p.default, p.name)


# -- interruptions --------------------------------------------------------------------------------------


def test_a_store_whose_creation_stopped_is_made_again(tmp_path, monkeypatch, reference, capsys):
    """A crash between the root zarr.json and store.json (here: while the plan's arrays are made) leaves no store;
    the same command then makes it, and the result equals a clean extraction."""
    from storage import zarr_units

    store = tmp_path / "store"
    real = zarr_units.UnitArrays.create

    def crash(location, specs, *args, **kwargs):
        real(location, dict(list(specs.items())[:1]), *args, **kwargs)  # one array of the plan, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(zarr_units.UnitArrays, "create", classmethod(lambda cls, *a, **k: crash(*a, **k)))
    argv = [*SAME_AS_BASE, "--store", str(store)]
    assert main(["--quiet", *argv]) == 130
    assert "committed units are kept; run the same command again" in capsys.readouterr().err
    assert (store / "zarr.json").is_file() and not (store / "store.json").exists()
    monkeypatch.undo()
    assert main(["--quiet", *argv]) == 0
    s = Store(store)
    for group, arrays in (("plan", group_arrays(s.plan)), ("t1", group_arrays(s.teacher("t1")))):
        for name, want in reference[group].items():
            np.testing.assert_array_equal(arrays[name], want)


def test_a_kill_right_after_the_root_zarr_json_is_resumed(tmp_path, capsys):
    """SIGKILL the real command as soon as the store's root zarr.json appears; running it again finishes the store."""
    store = tmp_path / "store"
    argv = [*SAME_AS_BASE[:-2], "--batch-size", "16", "--store", str(store)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--quiet", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.time() + 120
        while not (store / "zarr.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert (store / "zarr.json").exists()  # killed at creation, or (on a slow start) a little later: both resume
    capsys.readouterr()
    assert main(["--quiet", *argv]) == 0
    assert main(["--quiet", "verify", str(store), "--replay", "0"]) == 0


def test_epochs_0_leaves_no_run_folder(tmp_path, base_store, capsys):
    for argv in ([*D[:-1], str(tmp_path / "d")], [*T[:-1], str(tmp_path / "t")]):
        argv = [a.replace("{store}", str(base_store)) for a in replace(argv, "--epochs", "0")]
        assert main(argv) == 2
        assert "--epochs" in one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_a_run_refused_late_in_its_set_up_leaves_the_finished_folder_alone(shared, capsys):
    """The student, method and optimiser are built inside train(); a student argument timm refuses is found only
    then, and config.yaml, run.log, metrics and student are still the old run's."""
    argv = [a.replace("{store}", str(shared["store"])).replace("{run}", str(shared["run"])) for a in D]
    assert main([*argv, "--method", "dkd", "--student-arg", "bogus=1"]) == 2
    assert "bad student settings for resnet10t" in one_line(capsys)
    assert read_tree(shared["run"]) == shared["trees"]["run"]


# -- store damage: a directory or a pipe where a shard should be -------------------------------------------


def _shard(store: Path) -> Path:
    return next(
        p for p in sorted((store / "teachers" / "t1" / "logits").rglob("*")) if p.is_file() and p.name != "zarr.json"
    )


def test_a_directory_where_a_shard_should_be(store_copy, capsys):
    shard = _shard(store_copy)
    shard.unlink()
    shard.mkdir()
    (shard / "keep").write_text("somebody's file")
    assert main(["--quiet", *SAME_AS_BASE, "--store", str(store_copy), "--repair"]) == 2
    assert "is a directory where a file of the store should be" in one_line(capsys)
    assert (shard / "keep").read_text() == "somebody's file"  # refused, not deleted
    shutil.rmtree(shard)
    assert main(["--quiet", *SAME_AS_BASE, "--store", str(store_copy), "--repair"]) == 0
    assert main(["--quiet", "verify", str(store_copy), "--replay", "0"]) == 0


def test_a_pipe_where_a_shard_should_be_does_not_hang(store_copy, tmp_path, capsys):
    shard = _shard(store_copy)
    shard.unlink()
    os.mkfifo(shard)
    results = {}
    commands = {
        "verify": ["verify", str(store_copy), "--replay", "0"],
        "distill": [a.replace("{store}", str(store_copy)).replace("{run}", str(tmp_path / "run")) for a in D],
    }

    def run_all():
        for name, argv in commands.items():
            results[name] = (main(["--quiet", *argv]), capsys.readouterr())

    worker = threading.Thread(target=run_all, daemon=True)
    worker.start()
    worker.join(300)
    assert not worker.is_alive(), "a reader waits on the pipe"
    assert results["verify"][0] == 2 and "not a regular file" in results["verify"][1].out
    assert results["distill"][0] == 2 and "not a regular file" in results["distill"][1].err
    assert len(results["distill"][1].err.strip().splitlines()) == 1


# -- messages that misled ---------------------------------------------------------------------------------


def test_an_unfinished_extraction_is_not_called_damaged(store_copy, capsys):
    Store(store_copy).teacher("t1").uncommit(1, 2)
    assert main(["--quiet", "verify", str(store_copy), "--replay", "0"]) == 2
    line = one_line(capsys)
    assert "1 unit(s) not extracted yet: run the extract command again to finish" in line and "--repair" not in line


def test_interrupted_runs_say_what_is_kept(monkeypatch, capsys, base_store, tmp_path):
    def stop(args, *rest):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_commands, "distill_command", stop)
    argv = [a.replace("{store}", str(base_store)).replace("{run}", str(tmp_path / "r")) for a in D]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted: no epoch had finished") and "start over" in err[-1]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"")  # an epoch had finished
    assert main(argv) == 130
    assert "run the same command with --resume" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*argv, "--ray-workers", "2"]) == 130
    assert "--resume" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_full_disk_names_the_file(monkeypatch, capsys, base_store, tmp_path):
    def full(args, *rest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distill_commands, "distill_command", full)
    argv = [a.replace("{store}", str(base_store)).replace("{run}", str(tmp_path / "r")) for a in D]
    assert main(argv) == 2
    line = one_line(capsys)
    assert line.startswith("error: no space left on device: free space") and ": ;" not in line


def test_library_warnings_stay_off_the_console(monkeypatch, capsys, base_store, tmp_path):
    import warnings

    from storage import UserError

    def warn_then_fail(args, *rest):
        warnings.warn("divide by zero encountered in remainder", RuntimeWarning)
        raise UserError("what is wrong, what to do")

    monkeypatch.setattr(distill_commands, "distill_command", warn_then_fail)
    argv = [a.replace("{store}", str(base_store)).replace("{run}", str(tmp_path / "r")) for a in D]
    assert main(argv) == 2
    assert one_line(capsys) == "error: what is wrong, what to do"


def test_weights_that_do_not_fit_say_which_keys(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "small.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(weights))
    assert (
        main(
            [
                "extract",
                "--data",
                DATA,
                "--teacher",
                "resnet18",
                "--weights",
                str(weights),
                "--views",
                "1",
                "--store",
                str(tmp_path / "s"),
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert "missing key(s) (e.g. " in line and "unexpected key(s)" in line and "of another shape" in line
    assert not (tmp_path / "s").exists()


def test_a_partial_store_reports_compression_of_what_it_holds(store_copy, capsys):
    store = Store(store_copy)
    full = store.teacher("t1").describe()["logits"]
    for block in range(store.num_blocks):
        store.teacher("t1").uncommit(1, block)
        shutil.rmtree(store_copy / "teachers" / "t1" / "logits" / "c" / "1", ignore_errors=True)
    assert main(["--quiet", "inspect", str(store_copy), "--teacher-id", "t1"]) == 0
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if line.startswith("logits "))
    stored = store.teacher("t1").describe()["logits"]["stored_bytes"]
    ratio = float(row[-1].rstrip("x"))
    # raw bytes of view 0 only, over its stored bytes
    assert ratio == pytest.approx(full["nbytes"] / 2 / stored, abs=0.01)


# -- a store is the tool's own tree: no writing through a symbolic link inside it ------------------------


@pytest.mark.parametrize("inside", ["logs", "teachers/t1/logits/c/2"])
def test_a_symbolic_link_inside_the_store_is_refused_and_reported(inside, store_copy, tmp_path, capsys):
    """A linked logs/ folder or shard folder would carry the extraction's log, config or new view's shard to another
    place: extraction refuses in one line naming the link, before anything changes; verify lists the link."""
    elsewhere = tmp_path / "elsewhere"
    link = store_copy / inside
    if link.exists():
        shutil.move(link, elsewhere)
    else:
        elsewhere.mkdir()
    link.symlink_to(elsewhere, target_is_directory=True)
    before, outside = read_tree(store_copy), read_tree(elsewhere)
    capsys.readouterr()
    assert main([*replace(SAME_AS_BASE, "--views", "3"), "--store", str(store_copy)]) == 2
    line = one_line(capsys)
    assert f"{link} is a symbolic link inside the store" in line and "replace the link with a real directory" in line, (
        line
    )
    assert read_tree(store_copy) == before and read_tree(elsewhere) == outside  # nothing written, inside or outside
    assert main(["--quiet", "verify", str(store_copy), "--replay", "0"]) == 2
    out, err = capsys.readouterr()
    assert (
        f"{link}: a symbolic link inside the store (to {elsewhere})" in out
        and "symbolic link(s) inside the store" in err
    )


def test_a_link_made_during_a_write_is_not_written_through(store_copy, tmp_path):
    """The store's own writes check the folders on their way: a shard folder linked after the extraction began."""
    from storage import UserError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = Store(store_copy)
    store.add_views(3)
    group = store.teacher("t1")
    group.resize_views(3)
    (store_copy / "teachers" / "t1" / "logits" / "c" / "2").symlink_to(elsewhere, target_is_directory=True)
    rows = {name: np.zeros((BLOCK, *group.array(name).shape[2:]), group.array(name).dtype) for name in group.names}
    with pytest.raises(UserError, match="is a symbolic link inside the store"):
        group.write_unit(2, 0, rows)
    with pytest.raises(UserError, match="is a symbolic link inside the store"):
        (store.path / "teachers" / "t1" / "logits" / "c" / "2" / "x.json").write_json({})
    assert not list(elsewhere.iterdir())


# -- numbers read from a store, a checkpoint or a shard are checked before they size anything -------------

# (file, field, value, a piece of the one line): each names its file and field.
DAMAGED_RECORDS = {
    "teacher-classes-1e12": (
        "teachers/t1/teacher.json",
        "num_classes",
        1e12,
        "teacher.json: field 'num_classes' must be a whole number in [0,",
    ),
    "teacher-classes-off": (
        "teachers/t1/teacher.json",
        "num_classes",
        11,
        "teacher.json: field 'num_classes' says rows of [11], but array logits has rows of [10]",
    ),
    "teacher-features-huge": (
        "teachers/t1/teacher.json",
        "feature_dim",
        10**8,
        "teacher.json: field 'feature_dim' must be",
    ),
    "teacher-views-above-arrays": (
        "teachers/t1/teacher.json",
        "views",
        5,
        "teacher.json: field 'views' is 5, but array",
    ),
    "teacher-size-negative": ("teachers/t1/teacher.json", "input_size", -5, "teacher.json: field 'input_size' must be"),
    "store-samples-1e12": (
        "store.json",
        "num_samples",
        10**12,
        "store.json: field 'num_samples' must be a whole number in [1,",
    ),
    "store-samples-off": (
        "store.json",
        "num_samples",
        81,
        "store.json: field 'num_samples' is 81, but the order array has 80 rows",
    ),
    "store-block-negative": ("store.json", "block", -32, "store.json: field 'block' must be a whole number in [1,"),
    "store-block-off": (
        "store.json",
        "block",
        16,
        "store.json: field 'block' is 16, but the plan's shards hold 32 samples",
    ),
    "store-views-above-arrays": (
        "store.json",
        "num_views",
        100000,
        "store.json: field 'num_views' is 100000, but the plan's arrays hold 2 views",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_RECORDS), ids=list(DAMAGED_RECORDS))
def test_a_hand_edited_record_is_one_line_naming_file_and_field(case, store_copy, tmp_path, capsys):
    import json

    file, key, value, says = DAMAGED_RECORDS[case]
    record = json.loads((store_copy / file).read_text())
    record[key] = value
    if file == "store.json" and key == "num_samples":
        record["dataset"]["num_samples"] = value  # edited consistently: only the arrays can tell
    (store_copy / file).write_text(json.dumps(record))
    before = read_tree(store_copy)
    run = tmp_path / "run"
    for argv in (
        ["verify", str(store_copy), "--replay", "0"],
        ["inspect", str(store_copy)],
        [a.replace("{store}", str(store_copy)).replace("{run}", str(run)) for a in D],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        line = one_line(capsys)
        assert says in line and "damaged" in line, line
    assert read_tree(store_copy) == before and not run.exists()


@pytest.mark.parametrize(
    "edit,says",
    [
        ("epoch=1000000000", "field 'epoch' is 1000000000, not an epoch of the saved run's 1 epochs"),
        ("epoch=0", "field 'epoch' is 0"),
        ("metrics=[]", "field 'metrics' must hold one line per finished epoch (1)"),
        ("drop=model", "field 'model' is missing"),
    ],
)
def test_a_hand_edited_checkpoint_is_one_line(edit, says, shared, tmp_path, capsys):
    def edited(state):
        key, value = edit.split("=")
        if key == "drop":
            del state[value]
        else:
            state[key] = eval(value)

    run, line = _resume_edited(shared, tmp_path, capsys, edited)
    assert f"{run / 'checkpoint.pt'}: {says}" in line and "run without --resume" in line, line


@pytest.mark.parametrize(
    "part",
    [
        "model",
        "method",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "student_weights",
        "student",
        "run",
        "epoch",
        "metrics",
    ],
)
def test_every_part_of_a_checkpoint_of_another_type_is_one_line(part, shared, tmp_path, capsys):
    """Each part a resumed run reads, replaced by a string: one line naming the part, not a traceback where it is used."""
    run, line = _resume_edited(shared, tmp_path, capsys, lambda state: state.__setitem__(part, "abc"))
    assert part in line and ("damaged" in line or "does not fit this run" in line) and "--resume" in line, line


def _resume_edited(shared, tmp_path, capsys, edit) -> tuple[Path, str]:
    """``--resume --epochs 2`` of a copy of the shared finished run whose checkpoint ``edit`` changed in place:
    (the run folder, the one line); the command exits 2 and changes nothing in the folder."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(shared["run"], run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "checkpoint.pt")
    before = read_tree(run)
    argv = [a.replace("{store}", str(shared["store"])).replace("{run}", str(run)) for a in replace(D, "--epochs", "2")]
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    line = one_line(capsys)
    assert read_tree(run) == before  # a finished run's student and config are still there
    return run, line


def _jpeg(i: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), i * 10, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "case,says",
    [
        ("class-2e9", "train-0000.tar/k7 has class 2000000000: classes are numbers from 0 to 1,048,575"),
        ("cut-between-members", "train-0000.tar is truncated (it ends at sample k11, without the tar's end marker)"),
        ("cut-inside-a-member", "train-0000.tar is truncated"),
        # All its bytes there, one member header damaged: tarfile stops there as at the end, 3 samples of 12, silently.
        (
            "header-checksum",
            "train-0000.tar is damaged at byte {at} (after member k2.cls, 3 samples read): a member header there cannot be read (bad checksum)",
        ),
        ("header-zeroed", "train-0000.tar is damaged at byte {at} (after member k2.cls, 3 samples read): a zero block"),
    ],
)
def test_a_damaged_wds_shard_is_one_line(case, says, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no index cached from an earlier test
    shard = tmp_path / "train-0000.tar"
    samples = [(f"k{i}", {"jpg": _jpeg(i), "cls": str(i % 3).encode()}) for i in range(12)]
    if case == "class-2e9":
        samples[7][1]["cls"] = b"2000000000"  # would build two billion class names
    _tar(shard, samples)
    data = shard.read_bytes()
    if case == "cut-between-members":
        # tarfile reads it as a shorter tar whose last sample has no .cls
        shard.write_bytes(data[: data.index(b"k11.cls")])
    elif case == "cut-inside-a-member":
        shard.write_bytes(data[: len(data) // 2 + 100])
    elif case.startswith("header-"):
        at = data.index(b"k3.jpg")  # its header block
        says = says.format(at=at)
        shard.write_bytes(
            data[:at]
            + (b"\0x#!" + data[at + 4 : at + 512] if case == "header-checksum" else bytes(512))
            + data[at + 512 :]
        )
    store = tmp_path / "store"
    capsys.readouterr()
    assert (
        main(
            [
                "extract",
                "--data",
                f"wds:{shard}",
                "--teacher",
                "resnet18",
                "--random-init",
                "--size",
                "32",
                "--views",
                "1",
                "--store",
                str(store),
            ]
        )
        == 2
    )
    line = one_line(capsys)
    assert says in line and "no .cls member" not in line, line
    assert not store.exists()


def test_a_store_deleted_during_distill_is_said_to_be_gone(store_copy, tmp_path, monkeypatch, capsys):
    """Not "unit not committed ... --repair", and not a student trained on the zeros zarr reads for missing shards."""
    from storage import zarr_units

    real, calls = zarr_units.UnitArrays._read_data, []

    def read_then_delete(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the store goes away once distill has started reading it
            shutil.rmtree(store_copy)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zarr_units.UnitArrays, "_read_data", read_then_delete)
    argv = [a.replace("{store}", str(store_copy)).replace("{run}", str(tmp_path / "run")) for a in D]
    capsys.readouterr()
    # the run has started (its first lines say so): the error is the one line after them
    assert main(["--quiet", *argv]) == 2
    line = one_line(capsys)
    assert (
        "no longer exists: the store was deleted or moved while this command read it" in line and "--repair" not in line
    ), line
    assert len(calls) >= 2


def test_resume_with_weights_that_do_not_fit_is_one_line_and_changes_nothing(shared, tmp_path, capsys):
    import timm

    def other_weights(state):  # same settings, another model's weights
        state["model"] = timm.create_model("resnet10t", num_classes=10).state_dict()

    _, line = _resume_edited(shared, tmp_path, capsys, other_weights)
    assert "does not fit this run" in line and "drop --resume" in line, line


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_is_refused_at_set_up_and_nothing_is_made(fmt, tmp_path, capsys):
    """The header pass reads each file's last bytes too: a truncated JPEG or PNG is refused before --out or --store
    exists, by every command that reads a folder (it used to be met mid-run, after the folder was made)."""
    import io

    from PIL import Image

    data = tmp_path / "data"
    for c in range(2):
        (data / f"c{c}").mkdir(parents=True)
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(c * 10 + i).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                buf, fmt
            )
            (data / f"c{c}" / f"{i}.{fmt.lower()}").write_bytes(buf.getvalue())
    bad = data / "c1" / f"3.{fmt.lower()}"
    bad.write_bytes(bad.read_bytes()[:-40])
    source = f"folder:{data}"
    commands = {
        "prepare": ["prepare", "--data", source, "--out", str(tmp_path / "out")],
        "extract": [
            "extract",
            "--data",
            source,
            "--teacher",
            "resnet18",
            "--random-init",
            "--size",
            "32",
            "--views",
            "1",
            "--store",
            str(tmp_path / "out"),
        ],
        "train": [
            "train",
            "--data",
            source,
            "--model",
            "resnet10t",
            "--model-arg",
            "channels=[8,16,32,64]",
            "--epochs",
            "1",
            "--size",
            "32",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "out"),
        ],
    }
    for name, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        # extract says its store's size first, before the header pass
        err = capsys.readouterr().err.strip().splitlines()
        line = err[-1]
        assert "Traceback" not in "".join(err) and line.startswith("error: ") and len(err) <= 2, (name, err)
        assert f"cannot decode image {bad}" in line and "truncated" in line, (name, line)
        assert not (tmp_path / "out").exists(), name
