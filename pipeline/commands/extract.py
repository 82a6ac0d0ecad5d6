"""`pipeline extract`, `verify` and `stats`: stage one into a store, the store's integrity, and reductions over its cache."""

from __future__ import annotations

import argparse
import logging
import time

from stages.cache import stats, verify
from stages.cache.store_setup import store_dataset
from stages.cpus import use_threads
from stages.cache.teacher_rows import storage_line
from stages.data.prepare import is_prepared
from stages.data.views import ViewRecipe
from stages.settings import ModelArgs
from stages.teachers.extract import TEACHER_BATCH
from stages.teachers.extract_job import BLOCK, TOPK, ExtractJob, prepare_extract
from stages.teachers.teacher_sources import pick_teacher
from stages.teachers.teachers import list_teachers
from storage import Location, Store, UserError, list_backends
from storage.names import check_name
from storage.teacher_record import DTYPES, FEATURE_DTYPES, PRECISIONS

from pipeline.settings import config

from pipeline.cluster import ray_env

from pipeline.cluster.extract import extract_on_ray, join_cluster
from pipeline.commands.prepare import verify_prepared_command
from pipeline.settings.shared_flags import (
    RAY_ADDRESS_HELP,
    THREADS_HELP,
    data_help,
    local_device,
    teacher_flags,
    view_flags,
    view_recipe,
)
from pipeline.settings.recipe import VIEWS, load_recipe
from pipeline.runs.files import run_log
from pipeline.settings.setting_flags import flag_type, settings_from_args

log = logging.getLogger("pipeline")


def add_extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="stage one: run a frozen teacher over recorded views into a store")
    p.add_argument("--data", required=True, help=data_help())
    p.add_argument(
        "--teacher",
        required=True,
        help=f"short name ({', '.join(list_teachers())}), any timm model, or a timm model folder: local-dir:PATH (a `pipeline train` "
        "run's folder) or hf-hub:REPO; a folder's config.json gives the architecture, model arguments, input size and normalisation",
    )
    teacher_flags(p, "--teacher-seed", model_args=True)
    p.add_argument(
        "--teacher-id",
        help="name of the teacher inside the store (default: --teacher as a plain name; a local-dir: folder's own name)",
    )
    p.add_argument(
        "--store",
        required=True,
        help="store directory or fsspec URL (s3://bucket/path); created on first use, resumed or extended later",
    )
    p.add_argument("--views", type=int, required=True, help="views per sample; more than the store has appends views")
    p.add_argument("--size", type=int, help="render size of the teacher's views (default: the teacher's input size)")
    p.add_argument(
        "--block",
        type=int,
        help=f"samples per shard, the unit of work, fixed when a store is made (default: {BLOCK} for a new store; an existing one keeps its own)",
    )
    _output_flags(p)
    p.add_argument(
        "--batch-size",
        type=flag_type("batch_size"),
        default=TEACHER_BATCH,
        help=f"teacher batch size (default: {TEACHER_BATCH})",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the teacher's arithmetic: bf16 autocast is the fast choice on GPUs that have it; recorded in teacher.json, "
        "and every extraction into one teacher id must use the same (default: fp32)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="loader processes rendering views ahead of the teacher (per Ray actor with --actors) (default: 0)",
    )
    p.add_argument("--threads", type=flag_type("threads"), help=THREADS_HELP)
    p.add_argument(
        "--device",
        help="where the teacher runs, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu; on Ray: cuda for GPU actors, else cpu)",
    )
    _extract_ray_flags(p)
    p.add_argument(
        "--repair",
        action="store_true",
        help="first check every committed unit and rewrite the damaged ones (default: off)",
    )
    p.add_argument(
        "--config", help="YAML recipe; its views: section sets the view plan, flags override it (default: none)"
    )
    view_flags(p)
    p.set_defaults(func=extract_command)


def _output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what is stored")
    g.add_argument(
        "--logits", choices=("topk", "full"), default="topk", help="store top-k logits or all of them (default: topk)"
    )
    g.add_argument(
        "--topk",
        type=int,
        help=f"k for --logits topk, at most the teacher's class count (default: {TOPK}, or every class when fewer)",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="stored float type; float32 stores are exact (default: float16)",
    )
    g.add_argument(
        "--format",
        choices=list_backends(),
        default="zarr",
        help="how teacher outputs are stored (a store backend): zarr arrays, or wds: one webdataset tar per (view, block) unit, for streaming; "
        "fixed per teacher id (default: zarr)",
    )
    g.add_argument(
        "--feature-dtype",
        choices=FEATURE_DTYPES,
        help="stored type of features and tokens; int8 keeps a float32 scale per vector, about 1 byte per value (default: the --dtype value)",
    )
    g.add_argument(
        "--outputs",
        help="comma-separated outputs to store: logits, features, tokens (CLS and patch tokens, large: the cost is logged first) "
        "(default: all the teacher has except tokens)",
    )


def _extract_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "Ray (extraction spread over actors, each holding one teacher and taking (view, block) units from a queue)"
    )
    g.add_argument(
        "--actors",
        type=int,
        help="Ray actors; 0 runs in this process without Ray (default: 0, but with --ray-address or RAY_ADDRESS one per GPU, or one per node on a CPU-only cluster)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
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
        type=float,
        default=0.01,
        help="share of views re-rendered and compared with their fingerprints, 0 to skip (default: 0.01)",
    )
    p.add_argument("--data", help="the training data, when it moved since extraction (default: the store's)")
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering replayed views (default: 0)")
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
    """The extraction the flags and the --config file describe, resolved once."""
    return ExtractJob(
        store=args.store,
        data=args.data,
        teacher=args.teacher,
        views=args.views,
        teacher_id=args.teacher_id,
        weights=args.weights,
        random_init=args.random_init,
        teacher_seed=args.teacher_seed,
        model_args=_model_args(args.model_args),
        size=args.size,
        block=args.block,
        view_settings=_view_settings(args),
        plan_seed=args.plan_seed,
        outputs=tuple(o.strip() for o in args.outputs.split(",")) if args.outputs else None,
        logits=args.logits,
        topk=args.topk,
        dtype=args.dtype,
        feature_dtype=args.feature_dtype,
        format=args.format,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
    )


def _model_args(pairs: list[str] | None) -> dict:
    """--model-arg KEY=VALUE pairs as timm.create_model arguments, checked as `train`'s --model-arg is."""
    args = config.parse_pairs(pairs, "--model-arg")
    try:
        return ModelArgs().check(args)
    except (ValueError, TypeError):
        raise UserError(f"--model-arg takes {ModelArgs.what}, not {', '.join(pairs or [])}") from None


def _view_settings(args) -> dict:
    """The view settings given, flags over the ``views:`` section of --config, each checked now in the words of where it came from."""
    view_recipe(args)
    return config.merge(load_recipe(args.config).get(VIEWS) or {}, settings_from_args(args, ViewRecipe))


def extract_command(args) -> None:
    # --actors N, or a cluster address without --actors, runs on Ray; the driver then needs no GPU and no weights.
    use_ray = ray_env.uses_actors(args.actors, args.ray_address)
    if use_ray and args.threads:
        raise UserError(
            "--threads sets the threads of an extraction in this process; each Ray actor takes the CPUs Ray gives it: drop --threads"
        )
    job = extract_job(
        args, None if use_ray else local_device(args.device)
    )  # on Ray, the actors' device comes from the cluster
    ready = prepare_extract(
        job, load=not use_ray
    )  # every check, before a store directory exists or an existing one changes
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
        args_given = f", {', '.join(f'{k}={v}' for k, v in info.model_args.items())}" if info.model_args else ""
        log.info(
            "extract %s (%s%s, %s) on %s into %s: %d views x %d samples",
            teacher_id,
            info.timm_name,
            args_given,
            info.weights,
            job.device,
            store.path,
            job.views,
            len(dataset),
        )
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
        raise UserError(f"{store.path}: unfinished ({summary}): {'; '.join(todo)}")
    if report.links:
        todo.append(
            f"{len(report.links)} symbolic link(s) inside the store: replace each with a real directory holding its files"
        )
    raise UserError(f"{store.path}: {count['damaged'] + count['replay']} bad unit(s) ({summary}): {'; '.join(todo)}")
