"""`pipeline extract`, `verify` and `stats`: stage one into a store, the store's integrity, and reductions over its cache."""

from __future__ import annotations

import argparse
import logging
import time

from stages.cache import stats, verify
from stages.cache.store_setup import store_dataset
from stages.cpus import use_threads
from stages.settings import build
from stages.cache.teacher_rows import storage_line
from stages.data.prepare import is_prepared
from stages.teachers.extract_job import ExtractJob, prepare_extract
from stages.teachers.teacher_sources import pick_teacher
from stages.teachers.teachers import list_teachers
from storage import Location, Store, UserError, list_backends
from storage.names import check_name

from pipeline.settings import config

from pipeline.cluster import ray_env

from pipeline.cluster.extract import extract_on_ray, join_cluster
from pipeline.commands.prepare import verify_prepared_command
from pipeline.settings.shared_flags import (
    RAY_ADDRESS_HELP,
    THREADS_HELP,
    data_help,
    given_views,
    local_device,
    view_flags,
    view_recipe,
)
from pipeline.runs.files import run_log
from pipeline.settings.setting_flags import add_setting_flags, flag_type, settings_from_args

log = logging.getLogger("pipeline")


# Extraction's flags in the groups help shows; each is an ``ExtractJob`` field, declared there once.
THE_RUN = (
    "store",
    "data",
    "teacher",
    "weights",
    "random_init",
    "teacher_seed",
    "model_args",
    "teacher_id",
    "views",
    "size",
    "block",
)
STORED = ("outputs", "logits", "topk", "dtype", "feature_dtype", "format", "precision")
THE_WORK = ("batch_size", "workers", "device")


def add_extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="stage one: run a frozen teacher over recorded views into a store")
    add_setting_flags(
        p,
        ExtractJob,
        only=THE_RUN,
        helps={
            "data": data_help(),
            "teacher": f"short name ({', '.join(list_teachers())}), any timm model, or a timm model folder: "
            "local-dir:PATH (a `pipeline train` run's folder) or hf-hub:REPO; a folder's config.json gives the "
            "architecture, model arguments, input size and normalisation",
        },
    )
    # The backends registered now, as choices help lists (a plug-in's backend is one once imported).
    add_setting_flags(
        p.add_argument_group("what is stored"), ExtractJob, only=STORED, choices={"format": list_backends()}
    )
    g = p.add_argument_group("how the work is done")
    add_setting_flags(g, ExtractJob, only=THE_WORK)
    g.add_argument("--threads", type=flag_type("threads"), help=THREADS_HELP)
    g.add_argument(
        "--repair",
        action="store_true",
        help="first check every committed unit and rewrite the damaged ones (default: off)",
    )
    _extract_ray_flags(p)
    p.add_argument(
        "--config", help="YAML recipe; its views: section sets the view plan, flags override it (default: none)"
    )
    view_flags(p)
    p.set_defaults(func=extract_command)


def _extract_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "Ray (extraction spread over actors, each holding one teacher and taking (view, block) units from a queue)"
    )
    g.add_argument(
        "--actors",
        type=flag_type("actors"),
        help="Ray actors; 0 runs in this process without Ray (default: 0, but with --ray-address or RAY_ADDRESS one per GPU, or one per node on a CPU-only cluster)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=flag_type("gpus_per_worker"),
        help="GPUs each actor holds; 0 makes CPU actors (default: 0 with --device cpu, else 1 when --device cuda is given or the cluster has GPUs, else 0)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help=f"{RAY_ADDRESS_HELP}; setting it (or RAY_ADDRESS) runs on Ray (default: RAY_ADDRESS, else a local Ray instance started for --actors N)",
    )


def add_verify_parser(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check a store (unit counts, checksums against commit records, a sample of replayed views) or prepared shards",
    )
    p.add_argument(
        "store",
        metavar="STORE",
        help="the store (a directory or URL such as s3://bucket/path), or a folder of shards made by `pipeline prepare` "
        "(each shard's size, sha256 and sample count against its manifest.json)",
    )
    p.add_argument("--teacher-id", help="teacher id in the store to check (default: every teacher, and the plan)")
    p.add_argument(
        "--replay",
        type=flag_type("replay"),
        default=0.01,
        help="share of views re-rendered and compared with their fingerprints, 0 to skip (default: 0.01)",
    )
    p.add_argument("--data", help="the training data, when it moved since extraction (default: the store's)")
    p.add_argument(
        "--workers", type=flag_type("workers"), default=0, help="loader processes rendering replayed views (default: 0)"
    )
    p.set_defaults(func=verify_command)


def add_stats_parser(sub) -> None:
    p = sub.add_parser(
        "stats", help="class means and feature moments of a teacher, reduced from its cache (KD++ needs them)"
    )
    p.add_argument("--store", required=True, help="the store made by `pipeline extract`")
    p.add_argument("--teacher-id", help="teacher id in the store (default: every teacher)")
    p.add_argument("--data", help="the training data, when it moved since extraction (default: the store's)")
    p.set_defaults(func=stats_command)


def extract_job(args, device: str | None) -> ExtractJob:
    """The extraction the flags and the --config file describe, resolved once (flags were checked as they parsed)."""
    given = settings_from_args(args, ExtractJob)
    return build(
        ExtractJob,
        {**given, "view_settings": _view_settings(args), "plan_seed": args.plan_seed, "device": device},
        "the command line",
    )


def _view_settings(args) -> dict:
    """The view settings given (flags over the ``views:`` section of --config), checked now in the words of where
    they came from; the store's recipe, or the defaults, fill the rest when the job is prepared."""
    given = given_views(args)
    view_recipe(args, given=given)
    return given


def extract_command(args) -> None:
    # --actors N, or a cluster address without --actors, runs on Ray; the driver then needs no GPU and no weights.
    use_ray = ray_env.uses_actors(args.actors, args.ray_address)
    if use_ray and args.threads:
        raise UserError(
            "--threads sets the threads of an extraction in this process; each Ray actor takes the CPUs Ray gives it: drop --threads"
        )
    # on Ray, the actors' device comes from the cluster
    job = extract_job(args, None if use_ray else local_device(args.device))
    # every check, before a store directory exists or an existing one changes
    ready = prepare_extract(job, load=not use_ray)
    _refuse_links(Location(args.store))
    if use_ray:  # cluster, GPUs and store visibility are checked before a store directory exists
        gpus_per_worker, actors, device = join_cluster(args)
        job = job.replace(device=device)
    teacher_id, info, dataset = job.id, ready.info, ready.dataset
    # Before any work, so a store of unexpected size (tokens) can be stopped at once.
    log.info(storage_line(teacher_id, info, len(dataset), job.views))
    dataset.sizes()  # reads every image header: unreadable files surface now
    if note := dataset.order_note():  # shards written in class order: blocks cannot be random samples
        log.warning(note)
    store = ready.open_store()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with run_log(store.path / "logs" / f"extract-{teacher_id}-{stamp}.log"):
        # The flags as given (to run the same command again) and the job they resolved to.
        flags = {"command": "extract", **vars(args), "func": None, "job": job.to_dict()}
        (store.path / "logs" / f"extract-{teacher_id}-{stamp}.yaml").write_bytes(config.dump(flags).encode())
        _say_extract(job, info, store, len(dataset))
        with store.lock_teacher(teacher_id):
            if args.repair:
                damaged = verify.take_back_damaged(store, teacher_id)
                log.info(
                    "repair: %d damaged unit(s) taken back%s",
                    len(damaged),
                    "".join(f"\n  {f.group} view {f.view} block {f.block}: {f.problem}" for f in damaged),
                )
            if use_ray:
                teacher, weights = ray_env.teacher_for_workers(job.teacher, job.weights)
                where = job.replace(
                    data=ray_env.source_for_workers(job.data),
                    store=ray_env.for_workers(store.path).url,
                    teacher=teacher,
                    weights=weights,
                )
                result = extract_on_ray(ready, where, actors=actors, gpus_per_worker=gpus_per_worker)
            else:
                log.info(
                    "%d CPU thread(s) beside %d loader process(es)", use_threads(args.threads, job.workers), job.workers
                )
                result = ready.run()
    rate = result.views / result.seconds if result.seconds > 0 else 0.0
    print(
        f"{teacher_id}: {result.units} units extracted ({result.views:,} views, {rate:,.0f} views/s), "
        f"{result.skipped} already committed -> {store.path}"
    )


def _say_extract(job: ExtractJob, info, store: Store, samples: int) -> None:
    args_given = f", {', '.join(f'{k}={v}' for k, v in info.model_args.items())}" if info.model_args else ""
    log.info(
        "extract %s (%s%s, %s) on %s into %s: %d views x %d samples",
        job.id,
        info.timm_name,
        args_given,
        info.weights,
        job.device,
        store.path,
        job.views,
        samples,
    )


def _refuse_links(store: Location) -> None:
    """Before anything is written: a symbolic link inside the store would carry its log, config or shards to another place."""
    links = store.links()
    if links:
        link, target = links[0]
        more = f" (and {len(links) - 1} more: `pipeline verify` lists them)" if len(links) > 1 else ""
        raise UserError(
            f"{link} is a symbolic link inside the store (to {target}){more}: extraction writes only inside the store; "
            "replace the link with a real directory (or move the store), then run the same command again"
        )


def stats_command(args) -> None:
    if args.teacher_id:
        check_name(args.teacher_id, "--teacher-id")  # it names stats/<id> in the store
    store = Store(args.store)
    dataset = store_dataset(store, args.data)
    for teacher_id in [args.teacher_id] if args.teacher_id else store.teacher_ids():
        arrays = stats.write_stats(store, teacher_id, dataset.labels)
        C, D = arrays["class_means"].shape
        print(
            f"{teacher_id}: class means ({C} x {D}), feature mean and covariance -> {store.path / 'stats' / teacher_id}"
        )


def verify_command(args) -> None:
    if is_prepared(args.store):
        return verify_prepared_command(args)
    store = Store(args.store)
    dataset = None
    if args.replay > 0:
        dataset = store_dataset(store, args.data)
    teachers = [pick_teacher(store, args.teacher_id)] if args.teacher_id else None
    report = verify.check_store(store, dataset, teachers, replay_fraction=args.replay, workers=args.workers)
    for f in report.findings:
        print(f"{f.group} view {f.view} block {f.block}: {f.problem}")
    for link, target in report.links:
        print(f"{link}: a symbolic link inside the store (to {target})")
    summary = f"{report.units} committed units checked, {report.views_replayed} views replayed"
    if report.ok:
        print(f"{store.path}: sound ({summary})")
        return
    if report.links and not report.findings:
        raise UserError(
            f"{store.path}: {len(report.links)} symbolic link(s) inside the store ({summary}): extraction refuses to write through them; "
            "replace each with a real directory holding its files"
        )
    raise _verify_failure(store, report, summary)


def _verify_failure(store: Store, report, summary: str) -> UserError:
    """One line for a store that is not sound: what is wrong, counted by kind, and what to run for each."""
    count = {kind: sum(f.kind == kind for f in report.findings) for kind in ("missing", "damaged", "replay")}
    todo = []
    if count["missing"]:
        todo.append(
            f"{count['missing']} unit(s) not extracted yet: run the extract command again to finish (it resumes)"
        )
    if count["damaged"]:
        todo.append(f"{count['damaged']} damaged unit(s): run the extract command again with --repair")
    if count["replay"]:
        todo.append(
            f"{count['replay']} unit(s) replay differently: compare the versions in store.json with this environment"
        )
    if not count["damaged"] and not count["replay"]:
        return UserError(f"{store.path}: unfinished ({summary}): {'; '.join(todo)}")
    if report.links:
        todo.append(
            f"{len(report.links)} symbolic link(s) inside the store: replace each with a real directory holding its files"
        )
    return UserError(f"{store.path}: {count['damaged'] + count['replay']} bad unit(s) ({summary}): {'; '.join(todo)}")
