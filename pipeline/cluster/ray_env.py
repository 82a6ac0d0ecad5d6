"""Joining Ray: a cluster named by --ray-address or RAY_ADDRESS, or a local instance started here.

``ray job submit -- pipeline ...`` runs the command on the cluster with
RAY_ADDRESS set, so the same command line works in a job unchanged. A cluster
that cannot be reached fails in seconds with one line instead of Ray's long
reconnect loop; a store that the cluster's nodes cannot see is found before any
work starts.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from storage import Location, UserError
from storage.errors import remote_user_error

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


def resolve_address(flag: str | None) -> str | None:
    """--ray-address, else RAY_ADDRESS, else None (start a local instance)."""
    address = flag or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


def uses_actors(actors: int | None, address: str | None) -> bool:
    """Whether a command with ``--actors`` runs on Ray: --actors N >= 1 does, 0 does not; without --actors, a cluster
    address (--ray-address or RAY_ADDRESS) does."""
    return actors > 0 if actors is not None else resolve_address(address) is not None


def _check_reachable(address: str) -> None:
    if address == "auto" or address.startswith("ray://"):
        host_port = address.removeprefix("ray://") if address != "auto" else None
    else:
        host_port = address
    if not host_port:
        return
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"Ray address '{address}' is not HOST:PORT (or ray://HOST:PORT): pass the head node's address, e.g. 10.0.0.1:6379"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(
            f"cannot reach the Ray cluster at {address} ({e.strerror or e}): start it with `ray start --head`, "
            "or check --ray-address / RAY_ADDRESS"
        ) from None


def connect(address: str | None = None) -> None:
    """Connect this process to Ray (once); with no address a local instance starts."""
    import ray

    if ray.is_initialized():
        return
    address = resolve_address(address)
    if address:
        _check_reachable(address)
    from pipeline.runs.files import library_logs_to_run_log

    library_logs_to_run_log("ray")  # before ray.init, which logs its token-authentication notice
    # Workers import the project from the driver's working tree; on a real cluster every node has it installed.
    # "local": a new instance even where `ray start` left one running (ray.init(None) would join that).
    ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=True)
    resources = ray.cluster_resources()
    log.info(
        "ray: %s, %d node(s), %g CPU, %g GPU",
        address or "local instance",
        len(ray.nodes()),
        resources.get("CPU", 0),
        resources.get("GPU", 0),
    )


def leave_quietly() -> None:
    """Shut this process's Ray down with its workers' output no longer forwarded: a Ctrl-C'd sweep's trial processes,
    ended by the shutdown, print crash dumps that would otherwise follow the command's last line on the console."""
    import ray

    try:
        from ray._private.worker import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")  # Ray's own name for the forwarding
    except (ImportError, AttributeError):  # another Ray version: its output may show, nothing else changes
        pass
    ray.shutdown()


def user_error(error: Exception) -> UserError | None:
    """The UserError a Ray error carries (a failed task, an actor or a Train worker that raised one), if any."""
    e, seen = error, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError) and not type(e).__module__.startswith("ray"):
            return e
        e = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    return remote_user_error(str(error))  # where only the remote traceback's text came back


def require_gpus(per_worker: float, workers: int) -> None:
    """Refuse at once when the cluster cannot give each worker its GPUs."""
    import ray

    if per_worker <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < per_worker:
        raise UserError(
            f"{per_worker:g} GPU per worker was asked for but the Ray cluster has {have:g} GPUs: "
            "add GPU nodes, or pass --gpus-per-worker 0 to run on CPUs"
        )
    if have < per_worker * workers:
        log.warning(
            "the cluster has %g GPUs for %d workers of %g: some workers wait for a GPU", have, workers, per_worker
        )


def for_workers(where: str | Location) -> Location:
    """A store or checkpoint place as Ray workers must name it: a local path made absolute (a worker's
    working directory is not the driver's), a URL as it is."""
    where = where if isinstance(where, Location) else Location(where)
    return Location(os.path.abspath(where.path)) if where.is_local else where


def source_for_workers(source: str | None) -> str | None:
    """A dataset source that means the same in a worker: a folder's path, local shards' pattern or a local Hugging Face
    dataset's folder made absolute (an hfds: hub name, which no local path matches, stays as it is)."""
    kind, _, rest = (source or "").partition(":")
    if kind == "folder" or (kind == "wds" and "://" not in rest):
        return f"{kind}:{os.path.abspath(rest)}"
    path, mark, options = rest.partition("?")
    if kind == "hfds" and os.path.exists(path):
        return f"{kind}:{os.path.abspath(path)}{mark}{options}"
    return source


def teacher_for_workers(teacher: str, weights: str | None) -> tuple[str, str | None]:
    """A teacher and weights file that mean the same in a worker: a local-dir: folder and a --weights path made absolute."""
    kind, _, rest = teacher.partition(":")
    if kind == "local-dir":
        teacher = f"{kind}:{os.path.abspath(rest)}"
    return teacher, os.path.abspath(weights) if weights else weights


def check_visible(location: Location, what: str) -> None:
    """Every node must see ``location`` (the store, the checkpoints): a probe file written here is looked for from each alive node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = location / f".probe-{uuid.uuid4().hex[:12]}"
    probe.write_bytes(b"probe")
    try:

        @ray.remote(num_cpus=0)
        def sees(url: str) -> tuple[str, bool]:
            return socket.gethostname(), Location(url).exists()

        nodes = [n for n in ray.nodes() if n["Alive"]]
        checks = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(probe.url)
            for n in nodes
        ]
        blind = [f"{n['NodeManagerAddress']} ({host})" for n, (host, ok) in zip(nodes, ray.get(checks)) if not ok]
    finally:
        probe.remove()
    if blind:
        raise UserError(
            f"{what} {location} is not visible from Ray node(s) {', '.join(blind)}: put it on storage every node "
            "mounts at the same path, or use an object-store URL (s3://...)"
        )
