"""`pipeline prepare`: folder or tar-shard images as webdataset shards made for replay (``stages.data.prepare``).

The order of work: every check that can refuse (settings, the view size, the data, the cluster, an output that
holds other shards) runs before anything is written; then the output is claimed, the shards not yet finished are
written (here, or by Ray actors, each writing whole shards), and the manifest comes last. ``pipeline verify OUT``
checks the result against its manifest (``verify_prepared_command``).
"""

from __future__ import annotations

import logging
import re
from functools import partial

from stages.data.prepare import PrepareJob, PrepareSettings, check_max_side, open_source, prepare, verify_prepared
from stages.settings import Location as LocationCheck, build
from storage import Location, UserError

from pipeline.cluster import ray_env
from pipeline.settings.shared_flags import RAY_ADDRESS_HELP
from pipeline.settings.recipe import VIEWS, check_views, load_recipe
from pipeline.settings.setting_flags import add_setting_flags, flag_type, settings_from_args

log = logging.getLogger("pipeline")

VIEW_SIZE = 224  # what --max-side is checked against when neither --size nor --config says: ImageNet's training views


def add_prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="write folder or tar-shard images as webdataset shards in a seeded random order, optionally re-encoded smaller",
    )
    p.add_argument(
        "--data",
        required=True,
        help="images to prepare: folder:PATH (one sub-folder per class) or wds:PATTERN (tar shards, local or at a URL "
        "such as s3://bucket/train-{0000..0099}.tar)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=flag_type("out", LocationCheck()),
        help="output folder or fsspec URL (s3://bucket/path): new or empty, or an unfinished one of the same command to resume",
    )
    g = p.add_argument_group("shards")
    add_setting_flags(g, PrepareSettings)
    g.add_argument(
        "--size",
        type=int,
        help=f"view size the shards are for: --max-side below it is refused (default: --config's size, else {VIEW_SIZE})",
    )
    g.add_argument(
        "--config",
        help="a recipe: its size and its views' smallest crop scale say what --max-side costs (default: none)",
    )
    g.add_argument(
        "--force", action="store_true", help="prepare with a --max-side below the view size anyway (default: refused)"
    )
    r = p.add_argument_group("Ray (shards spread over actors, each writing whole shards)")
    r.add_argument(
        "--actors",
        type=int,
        help="Ray actors; 0 runs in this process (default: 0, but with --ray-address or RAY_ADDRESS one per CPU of the cluster)",
    )
    r.add_argument(
        "--ray-address",
        metavar="ADDR",
        help=f"{RAY_ADDRESS_HELP}; setting it (or RAY_ADDRESS) runs on Ray (default: RAY_ADDRESS, else a local Ray instance for --actors N)",
    )
    p.set_defaults(func=prepare_command)


def _view_size(args) -> tuple[int, float, str]:
    """(view size, smallest crop scale, where they came from): --size over the recipe's, the recipe's views over the defaults."""
    recipe = load_recipe(args.config)
    views = check_views(recipe.get(VIEWS), args.config or "the default views")
    if args.size is not None:
        return args.size, views.scale[0], "--size"
    if recipe.get("size") is not None:
        return recipe["size"], views.scale[0], f"size in {args.config}"
    return VIEW_SIZE, views.scale[0], "the default; set --size or --config"


def prepare_command(args) -> None:
    settings = build(PrepareSettings, settings_from_args(args, PrepareSettings), "prepare flags")
    cost = check_max_side(settings.max_side, *_view_size(args), force=args.force)
    use_ray = ray_env.uses_actors(args.actors, args.ray_address)
    dataset = open_source(args.data)
    dataset.sizes()  # reads every image header (a folder's): files that are no image stop the run before anything is written
    out = Location(args.out)
    out.reach()
    job = PrepareJob(args.data, out.url, settings, dataset.fingerprint())
    write = None
    if use_ray:  # cluster and output visibility are checked before the output is claimed
        from pipeline.cluster.prepare import prepare_on_ray

        actors = _join_cluster(args, out)
        where = PrepareJob(
            ray_env.source_for_workers(args.data), ray_env.for_workers(out).url, settings, job.fingerprint
        )
        write = partial(prepare_on_ray, where, actors=actors)
    result = prepare(job, dataset, write, note=cost)
    m = result.manifest
    if result.already:
        print(
            f"{out}: already prepared ({m['num_shards']} shards, {m['num_samples']:,} samples); `pipeline verify {out}` checks them"
        )
        return
    size = sum(s["bytes"] for s in m["shards"])
    # Validation images (--prefix val, or a source named val..., as ImageNet's val folder is) are read with --val-data.
    flag = (
        "--val-data"
        if any(n.lower().startswith("val") for n in (m["prefix"], re.split(r"[/:]", args.data.rstrip("/"))[-1]))
        else "--data"
    )
    print(
        f"{result.written} shards written, {result.skipped} already finished ({m['num_samples']:,} samples, {size / 2**20:,.1f} MiB) -> {out}; "
        f"read them with {flag} wds:{out.url.rstrip('/')}/{m['pattern']}"
    )


def _join_cluster(args, out: Location) -> int:
    """Connect to Ray, and check that every node sees the output: before it is claimed. Returns the actor count."""
    import ray

    ray_env.connect(args.ray_address)
    ray_env.check_visible(ray_env.for_workers(out), "output")
    if args.actors:
        return args.actors
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def verify_prepared_command(args) -> None:
    """`pipeline verify OUT` where OUT holds prepared shards: one line per problem, exit 2 if there is one."""
    out = Location(args.store)
    report = verify_prepared(out)
    for problem in report.problems:
        print(problem)
    summary = f"{report.shards} shards, {report.samples:,} samples"
    if report.problems:
        raise UserError(
            f"{out}: {len(report.problems)} problem(s) in the prepared shards ({summary}): remove the shards named above and manifest.json, "
            "then run the same `pipeline prepare` command (it makes them again)"
        )
    print(f"{out}: sound ({summary}, each checked against manifest.json)")
