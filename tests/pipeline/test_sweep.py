"""`pipeline sweep`: the search space is checked before Ray starts, trials are distill runs on Ray Tune, a killed driver resumes.

The fast tests need no Ray. The slow ones run real sweeps on a local Ray over
``base_store`` (80 fake 32 px images, a random teacher) with the tiny student:
one 4-trial sweep in this process (2 methods x 2 temperatures, 2 at a time),
and one sweep driver started as a command, SIGKILLed once a trial finished,
and started again.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import STUDENT
from pipeline import cli
from pipeline.settings import config
from pipeline.settings.distill_job import distill_job
from pipeline.sweeps import spec as sweep_spec
from ray_cluster import _cmdline, _with_descendants
from stages.training.run_metrics import read_metrics

FIXED = {**STUDENT, "student_kwargs": {"channels": [8, 16, 32, 64]}, "epochs": 2, "batch_size": 16}
CLI = [sys.executable, "-m", "pipeline.cli"]


def _sweep_file(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- before any trial: the whole search space ---------------------------------------------------------


BAD = {
    "unknown setting": ({"search": {"lrr": [0.1, 0.2]}}, "unknown setting 'lrr' (did you mean lr?)"),
    "unknown fixed setting": ({"temprature": 4, "search": {"lr": [0.1]}}, "unknown setting 'temprature'"),
    "unknown method argument name": (
        {"search": {"method_args": {"temprature": [1, 4]}}},
        "method 'kd' has no setting temprature",
    ),
    "empty grid": ({"search": {"method": []}}, "search.method: the grid is empty"),
    "bad distribution": ({"search": {"lr": {"normal": [0, 1]}}}, "search.lr: give a list of values (a grid) or one of"),
    "reversed range": ({"search": {"lr": {"uniform": [0.1, 0.01]}}}, "uniform needs LOW < HIGH"),
    "loguniform from zero": ({"search": {"lr": {"loguniform": [0, 0.01]}}}, "loguniform needs LOW > 0"),
    "online": ({"online": True, "search": {"lr": [0.1]}}, "sweeps run from the cache"),
    "online searched": ({"search": {"online": [True, False]}}, "sweeps run from the cache"),
    "no search": ({"lr": 0.1}, "a sweep needs a search: section"),
    "samples": ({"samples": 0, "search": {"lr": [0.1]}}, "samples must be a whole number"),
    "metric": ({"metric": "accuracy", "search": {"lr": [0.1]}}, "metric must name a number of the epoch lines"),
    "metric no trial reports": (
        {"metric": "val_nonexistent", "search": {"lr": [0.1]}},
        "no trial reports metric val_nonexistent: validation gives val_top1",
    ),
    "method argument of one method only": (
        {"method_args": {"kd_weight": 2.0}, "search": {"method": ["kd", "dkd"]}},
        "method 'dkd' has no setting kd_weight",
    ),
    "unknown method": ({"search": {"method": ["kd", "kdd"]}}, "unknown method 'kdd'"),
    "wrong type": ({"search": {"epochs": [2, 2.5]}}, "trial epochs=2.5: epochs"),
    "unknown teacher": ({"search": {"teacher_id": ["t1", "t9"]}}, "t9"),
    "label fraction": (
        {"search": {"label_fraction": {"uniform": [0.5, 1.5]}}},
        "trial label_fraction=1.5: label_fraction",
    ),
    "randint of fractions": ({"search": {"epochs": {"randint": [1, 2.5]}}}, "randint takes [LOW, HIGH], whole numbers"),
    "randint from zero epochs": ({"search": {"epochs": {"randint": [0, 2]}}}, "trial epochs=0: epochs"),
    "student argument": (
        {"search": {"student_kwargs.chanels": [[8, 16, 32, 64]]}},
        "bad student settings for resnet10t",
    ),
    "a billion samples": (
        {"samples": 1_000_000_000, "search": {"lr": {"uniform": [0.1, 0.2]}}},
        "1,000,000,000 trials",
    ),
    "a million grid points": (
        {"search": {"lr": list(range(1, 101)), "seed": list(range(100)), "label_seed": list(range(100))}},
        "more than --max-trials 1,000",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_search_space_is_one_line_before_any_trial(case, base_store, tmp_path, capsys):
    data, message = BAD[case]
    out = tmp_path / "out"
    code = cli.main(
        [
            "sweep",
            "--from-cache",
            str(base_store),
            "--config",
            str(_sweep_file(tmp_path, {**FIXED, **data})),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    line = _one_line_error(capsys)
    assert message in line, line
    assert not out.exists()  # nothing was started: no sweep folder, no trial folder
    import ray

    assert not ray.is_initialized()


def test_online_flag_and_missing_inputs_are_one_line(base_store, tmp_path, capsys):
    good = str(_sweep_file(tmp_path, {**FIXED, "search": {"lr": [0.1]}}))
    assert (
        cli.main(["sweep", "--from-cache", str(base_store), "--config", good, "--out", str(tmp_path / "o"), "--online"])
        == 2
    )
    assert "sweeps run from the cache" in _one_line_error(capsys)
    assert cli.main(["sweep", "--config", good, "--out", str(tmp_path / "o")]) == 2
    assert "needs --from-cache STORE and --config" in _one_line_error(capsys)
    assert cli.main(["sweep", "--out", str(tmp_path / "o"), "--summary"]) == 2
    assert "holds no sweep" in _one_line_error(capsys)


def test_shipped_sweep_files_parse():
    files = sorted((config.CONFIG_DIR / "sweeps").glob("*.yaml"))
    assert files
    specs = {f.stem: sweep_spec.load_sweep(f) for f in files}
    assert specs["digits_methods"].num_trials == 4
    assert specs["random_lr"].num_trials == 16 and specs["random_lr"].early_stop == {
        "grace_epochs": 2,
        "reduction_factor": 2,
    }
    assert {a.name: a.kind for a in specs["random_lr"].axes} == {
        "lr": "loguniform",
        "weight_decay": "choice",
        "method_args.temperature": "uniform",
        "seed": "grid",
    }


def test_randint_draws_every_whole_number_from_low_to_high():
    from pipeline.sweeps.tune import param_space

    spec = sweep_spec.parse_sweep({"search": {"seed": {"randint": [1, 3]}}}, "test")
    domain = param_space(spec)["seed"]
    assert set(domain.sample(size=200)) == {1, 2, 3}


def test_a_trial_is_exactly_a_distill_run_with_its_resolved_config(base_store, tmp_path):
    """A trial's job, made from the sweep's settings without any command line, is the job `pipeline distill --config
    OUT/settings.yaml` makes from the settings file the trial leaves (its command to rerun by hand)."""
    spec = sweep_spec.parse_sweep(
        {
            **FIXED,
            "method_args": {"ce_weight": 0.5},
            "search": {"method": ["kd", "dkd"], "method_args.temperature": [4.0]},
        },
        "test",
    )
    base = {"store": str(base_store), "data": None, "val_data": None}
    for method in ("kd", "dkd"):
        out = tmp_path / method
        settings = sweep_spec.trial_settings(spec.fixed, {"method": method, "method_args.temperature": 4.0})
        sweep_spec.write_trial_settings(settings, out)
        trial = sweep_spec.trial_job(base, settings, "test")
        assert trial.train.method == method and trial.train.method_args == {"ce_weight": 0.5, "temperature": 4.0}
        assert (trial.train.student, trial.train.epochs, trial.train.batch_size) == ("resnet10t", 2, 16)
        command = sweep_spec.rerun_command(trial, out, "cpu", 2).split()
        # the trial's own threads
        assert command[:2] == ["pipeline", "distill"] and command[command.index("--threads") + 1] == "2"
        assert distill_job(cli.build_parser().parse_args(command[1:])) == trial
    assert (
        sweep_spec.TrialNamer(["method", "method_args.temperature"]).name(
            7, {"method": "dkd", "method_args.temperature": 4.0}
        )
        == "trial-007-method=dkd,temperature=4"
    )
    part = sweep_spec.TrialNamer(["method_args.dkd.weight"]).name(2, {"method_args.dkd.weight": 0.5})
    assert part == "trial-002-dkd.weight=0.5"  # a composite part's setting says which part


def test_summary_reads_the_trial_folders_alone(tmp_path, capsys):
    """--summary needs no Ray: the table, sweep.csv and sweep.png come from sweep.yaml and the trial folders."""
    from stages.training.run_metrics import RunMetrics

    out = tmp_path / "sweep"
    spec = sweep_spec.parse_sweep({"search": {"lr": [0.1, 0.2, 0.3]}}, "test")
    config.save(out / sweep_spec.SWEEP_FILE, {"command": "sweep", **spec.to_dict()})
    for i, (lr, tops, status) in enumerate(
        [(0.1, [0.2, 0.4], "finished"), (0.2, [0.3, 0.7], "finished"), (0.3, [], "error")]
    ):
        folder = out / f"trial-{i:03d}-lr={lr}"
        with RunMetrics(folder) as m:
            for e, top in enumerate(tops, 1):
                m.write({"epoch": e, "train_loss": 1.0 / e, "val_top1": top, "seconds": 1.0})
        sweep_spec.write_record(
            folder,
            {
                "status": status,
                "params": {"lr": lr},
                "seconds": 2.0 * len(tops),
                **({"error": "--batch-size 4096 is larger than ..."} if status == "error" else {}),
            },
        )
    assert cli.main(["sweep", "--out", str(out), "--summary"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["trial-001", "trial-000", "trial-002"]  # best first; no metric last
    assert "error: --batch-size 4096" in lines[3]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["trial"], r["status"], r["lr"], r["best_val_top1"], r["best_epoch"]) for r in rows] == [
        ("trial-001", "finished", "0.2", "0.7", "2"),
        ("trial-000", "finished", "0.1", "0.4", "2"),
        ("trial-002", "error", "0.3", "", ""),
    ]
    assert Image.open(out / "sweep.png").format == "PNG"


def test_summary_of_damaged_trial_records_and_an_unreported_metric(tmp_path, capsys):
    """A trial.json that is not an object, or whose fields have other types, and garbage in a metrics.jsonl: the
    summary reports the rest and says what it left out; a metric no trial reported (train_kd of method ce) is one
    clear line, after the table, not a ranking by nothing."""
    from stages.training.run_metrics import RunMetrics

    out = tmp_path / "sweep"
    spec = sweep_spec.parse_sweep({"search": {"lr": [0.1, 0.2, 0.3]}, "metric": "train_kd"}, "test")
    config.save(out / sweep_spec.SWEEP_FILE, {"command": "sweep", **spec.to_dict()})
    for i, lr in enumerate([0.1, 0.2, 0.3]):
        folder = out / f"trial-{i:03d}-lr={lr}"
        with RunMetrics(folder) as m:
            for e in (1, 2):
                m.write({"epoch": e, "train_loss": 1.0 / e, "train_ce": 1.0 / e, "val_top1": 0.1 * e, "seconds": 1.0})
        sweep_spec.write_record(folder, {"status": "finished", "params": {"lr": lr}, "seconds": 2.0})
    (out / "trial-001-lr=0.2" / "trial.json").write_text("[1, 2]")
    (out / "trial-002-lr=0.3" / "trial.json").write_text(json.dumps({"status": 3, "params": "lr", "seconds": "long"}))
    with open(out / "trial-002-lr=0.3" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": "one"}\n')
    assert cli.main(["sweep", "--out", str(out), "--summary"]) == 2
    printed, err = capsys.readouterr()
    assert "Traceback" not in err
    rows = [ln.split()[0] for ln in printed.splitlines() if ln.startswith("trial-")]
    # the one with a list for a record is left out, the other reads as unfinished
    assert rows == ["trial-000", "trial-002"]
    err = err.strip().splitlines()
    assert any("trial-001-lr=0.2/trial.json holds a JSON list, not a trial record" in ln for ln in err), err
    assert any("metrics.jsonl: skipped 1 line(s) that are not epoch lines" in ln for ln in err), err
    assert err[-1].startswith(
        "error: no trial reported metric train_kd, so nothing is ranked (their epochs report train_ce, train_loss, val_top1)"
    )


def test_rays_own_log_lines_go_to_the_run_log_not_the_console(tmp_path, capsys):
    """Ray logs its token-authentication notice through a stderr handler of its own while ``ray.init`` runs, before
    the sweep's log opens (``ray_env.connect`` routes it first): it reaches sweep.log, and the console not at all."""
    import logging

    from pipeline.cluster import ray_env
    from pipeline.runs.files import LIBRARY_LINES, library_logs_to_run_log, run_log

    cli.setup_logging(quiet=False)
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(logging.StreamHandler(sys.stderr))  # as `import ray` leaves it
    library_logs_to_run_log("ray")
    assert 'library_logs_to_run_log("ray")' in Path(ray_env.__file__).read_text()  # connect() does it before ray.init
    notice = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning(notice)
    with run_log(tmp_path / "sweep.log"):
        logging.getLogger("ray.tune").warning("a later line of Ray's")
        logging.getLogger("pipeline").warning("the pipeline's own warning")
    err = capsys.readouterr().err
    assert "Token authentication" not in err and "later line" not in err and "the pipeline's own warning" in err
    written = (tmp_path / "sweep.log").read_text()
    assert notice in written and "a later line of Ray's" in written and not LIBRARY_LINES.held


# -- real sweeps on Ray Tune --------------------------------------------------------------------------


def _stop(pids: list[int]) -> None:
    """End what the killed driver left (its local Ray), by process id, as recorded before the kill."""
    alive = {pid: _cmdline(pid) for pid in pids if _cmdline(pid)}
    deadline = time.time() + 10
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = {pid: cmd for pid, cmd in alive.items() if _cmdline(pid) == cmd}
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.local_ray
def test_ctrl_c_keeps_checkpoints_and_the_same_command_resumes_without_redoing_finished_trials(base_store, tmp_path):
    """A real SIGINT to the driver once trial 0 has finished and trial 2 has a checkpoint: the sweep exits 130 saying
    it was interrupted and how to go on, trial 2 keeps its checkpoint and is not called finished or stopped. The same
    command then runs no finished trial again, and continues trial 2 from its epoch, not from epoch 1.

    Trial 1 (4096: more than the 80 samples) fails at once, and Tune starts a fresh process for trial 2 (batches of
    2: 40 steps an epoch). The method is a composite whose one part's weight is a searched setting (one value).
    """
    path = _sweep_file(
        tmp_path,
        {
            **FIXED,
            "epochs": 4,
            "method": "kd@t1+dkd@t1",
            "search": {"batch_size": [16, 4096, 2], "method_args": {"dkd": {"weight": [0.5]}}},
        },
    )
    out = tmp_path / "out"
    argv = [
        *CLI,
        "sweep",
        "--from-cache",
        str(base_store),
        "--config",
        str(path),
        "--out",
        str(out),
        "--max-concurrent",
        "1",
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "first.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.PIPE, text=True, env=env)

    def trial(k: int) -> Path | None:
        return next(out.glob(f"trial-00{k}-*"), None)

    def first_finished() -> bool:
        record = trial(0) / "trial.json" if trial(0) else None
        return record is not None and record.is_file() and json.loads(record.read_text()).get("status") == "finished"

    pids: list[int] = []
    try:
        while not (first_finished() and trial(2) and (trial(2) / "checkpoint.pt").is_file()):
            assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
            assert time.perf_counter() - start < 240, log.read_text()[-3000:]
            time.sleep(0.05)
        pids = _with_descendants([proc.pid])
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(pids)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "interrupted: finished trials are kept and unfinished ones keep their last checkpoint; run the same command to resume the sweep"
    )
    first, third = trial(0), trial(2)
    assert json.loads((third / "trial.json").read_text())["status"] not in ("finished", "stopped early", "stopped")
    assert (third / "checkpoint.pt").is_file()
    done = len(read_metrics(third))
    assert 1 <= done < 4, "the sweep finished before the interrupt"
    before = {
        name: (first / name).stat().st_mtime_ns
        for name in ("metrics.jsonl", "student.safetensors", "trial.json", "run.log")
    }

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    print(f"interrupted with trial 2 after {done} epoch(s); the whole test took {time.perf_counter() - start:.1f} s")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished before are not run again" in again.stderr
    assert {name: (first / name).stat().st_mtime_ns for name in before} == before  # trial 0 was not trained again
    records = {p.name: json.loads((p / "trial.json").read_text()) for p in sorted(out.glob("trial-*"))}
    spans = [(r["started"], r["ended"]) for r in records.values()]
    # --max-concurrent 1: one after another
    assert all(ended <= began for (_, ended), (began, _) in zip(spans, spans[1:])), spans
    assert [r["status"] for r in records.values()] == ["finished", "error", "finished"]
    rows = [ln for ln in again.stdout.splitlines() if ln.startswith("trial-")]
    assert len(rows) == 3
    failed = next(ln for ln in rows if ln.startswith("trial-001"))
    # its one-line error
    assert "error: --batch-size 4096 is larger than a worker's share of the training set" in failed
    assert f"resuming the run in {third} from checkpoint.pt, saved after epoch" in (third / "run.log").read_text()
    # went on from its last epoch, not from scratch
    assert [line["epoch"] for line in read_metrics(third)] == [1, 2, 3, 4]
    assert {"train_kd", "train_dkd", "train_dkd.dkd"} <= set(read_metrics(third)[-1])  # each part's loss, logged apart
    assert not list(out.glob("trial-*/checkpoint.pt"))  # ended trials keep no checkpoint


@pytest.fixture(scope="module")
def four_trials(base_store, tmp_path_factory):
    """2 methods x 2 temperatures, 2 trials at a time, in this process on a local Ray (shut down afterwards)."""
    import ray

    tmp = tmp_path_factory.mktemp("sweep")
    path = _sweep_file(tmp, {**FIXED, "search": {"method": ["kd", "dkd"], "method_args": {"temperature": [1.0, 4.0]}}})
    out = tmp / "out"
    argv = [
        "sweep",
        "--from-cache",
        str(base_store),
        "--config",
        str(path),
        "--out",
        str(out),
        "--cpus-per-trial",
        "1",
        "--max-concurrent",
        "2",
    ]
    start = time.perf_counter()
    try:
        import contextlib
        import io

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            code = cli.main(argv)
        seconds = time.perf_counter() - start
        yield {
            "code": code,
            "out": out,
            "stdout": printed.getvalue(),
            "seconds": seconds,
            "store": base_store,
            "config": path,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()  # the local instance this test started; later tests must not find it


@pytest.mark.slow
@pytest.mark.local_ray
def test_four_trials_complete_with_table_csv_and_picture(four_trials):
    out, printed = four_trials["out"], four_trials["stdout"]
    print(f"4-trial sweep: {four_trials['seconds']:.1f} s")
    assert four_trials["code"] == 0, printed
    table = [ln for ln in printed.splitlines() if ln.startswith("trial-")]
    assert len(table) == 4 and all(ln.split()[-1] == "finished" for ln in table), printed
    best = [float(ln.split()[3]) for ln in table]
    assert best == sorted(best, reverse=True)  # ranked by val_top1
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert {(r["method"], float(r["method_args.temperature"])) for r in rows} == {
        ("kd", 1.0),
        ("kd", 4.0),
        ("dkd", 1.0),
        ("dkd", 4.0),
    }
    assert Image.open(out / "sweep.png").size[0] > 600


@pytest.mark.slow
@pytest.mark.local_ray
def test_each_trial_folder_holds_what_a_distill_run_writes(four_trials):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted(four_trials["out"].glob("trial-*"))
    assert len(folders) == 4
    spans = []
    for folder in folders:
        for name in ("config.yaml", "metrics.jsonl", "run.log", "student.safetensors", "settings.yaml", "trial.json"):
            assert (folder / name).is_file(), (folder, name)
        record = json.loads((folder / "trial.json").read_text())
        assert record["status"] == "finished" and record["command"].startswith("pipeline distill --from-cache")
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["command"] == "distill" and saved["job"] == record["job"]
        train = saved["job"]["train"]  # the sweep's fixed settings and the trial's values
        assert (train["method"], train["method_args"]["temperature"]) == (
            record["params"]["method"],
            record["params"]["method_args.temperature"],
        )
        assert train["student"] == "resnet10t" and train["epochs"] == 2 and train["batch_size"] == 16
        assert [ln["epoch"] for ln in read_metrics(folder)] == [1, 2]
        acc = EventAccumulator(str(folder))
        acc.Reload()
        assert {"train/loss", "val/top1", "lr", "views_per_s"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("val/top1")] == [1, 2]
        spans.append((record["started"], record["ended"]))
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap <= 2  # --max-concurrent 2


@pytest.mark.slow
@pytest.mark.local_ray
def test_gpus_per_trial_on_a_cluster_without_gpus_is_one_line(four_trials, tmp_path, capsys):
    # Ray is still up from the sweep above (a CPU-only local instance): this is the cluster asked.
    out = tmp_path / "gpu"
    code = cli.main(
        [
            "sweep",
            "--from-cache",
            str(four_trials["store"]),
            "--config",
            str(four_trials["config"]),
            "--out",
            str(out),
            "--gpus-per-trial",
            "1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "error: --gpus-per-trial 1 was asked for but the Ray cluster has 0 GPUs"
    ), err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--cpus-per-trial", "0", "--cpus-per-trial: must be a number in (0,"),
        ("--gpus-per-trial", "-1", "--gpus-per-trial: must be a number in [0,"),
        ("--max-concurrent", "-1", "--max-concurrent: must be an integer in [0,"),
        ("--max-trials", "0", "--max-trials: must be an integer in [1,"),
    ],
)
def test_ray_tune_flags_parse_with_their_declarations(flag, value, message, tmp_path, capsys):
    argv = ["sweep", "--from-cache", str(tmp_path), "--config", "s.yaml", "--out", str(tmp_path / "o"), flag, value]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()
