"""The output folder: claimed for one preparation, its finished shards found, the rest written, the manifest last.

A folder holds one preparation only (its identity, written first, is compared on every rerun), and a rerun
skips the shards whose records say they are finished: see the package docstring for the commit protocol.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storage import Location, UserError
from storage.lock import WriterLock, remove_stale_temp_files

from ..image_dataset import ImageDataset
from ..wds_index import MANIFEST
from .plan import CLAIM, LOCK, RECORDS, PrepareJob, ShardPlan, digest, record_name
from .shards import ShardMaker

log = logging.getLogger(__name__)


def claim_output(out: Location, identity: dict, source: str) -> bool:
    """Check that ``out`` is empty or holds this same preparation, and claim it; True when it is already finished.

    Refused before anything is written: a folder prepared from other data or with other settings (its shards would
    mix with these), and a folder holding files that no preparation wrote.
    """
    claim, manifest = out / RECORDS / CLAIM, out / MANIFEST
    made = read_json(claim) or read_json(manifest)
    if made is not None:
        _refuse_other(out, made, identity)
    elif out.listdir():
        raise UserError(
            f"{out} is not empty and holds no prepared shards (no {MANIFEST}): prepare into a new or empty --out"
        )
    if not claim.exists():
        claim.write_json({**identity, "source": source})
    return manifest.exists()


def read_json(loc: Location) -> dict | None:
    if not loc.exists():
        return None
    try:
        data = loc.read_json()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {loc}: {e}; it is damaged: remove the folder and prepare again") from None
    if not isinstance(data, dict):
        raise UserError(f"{loc} is not a preparation record: remove the folder and prepare again")
    return data


def _refuse_other(out: Location, made: dict, identity: dict) -> None:
    """One line naming what differs between the preparation in ``out`` and this one."""
    differ = [k for k in identity if made.get(k) != identity[k]]
    if not differ:
        return
    if "fingerprint" in differ or "num_samples" in differ:
        what = f"from other data ({made.get('source')}, {made.get('num_samples')} samples, fingerprint {str(made.get('fingerprint'))[:12]})"
    else:
        what = "with other settings (" + ", ".join(f"{k} {made.get(k)}, not {identity[k]}" for k in differ) + ")"
    raise UserError(f"{out} already holds shards prepared {what}: prepare into another --out, or remove {out} first")


def finished_shards(out: Location, plan: ShardPlan, identity: dict) -> dict[int, dict]:
    """The records of the shards already finished for this identity: record present and the shard of its recorded size.

    A shard whose record is missing, damaged or from another identity is made again (its bytes come out the same).
    """
    sizes, want = out.file_sizes(), digest(identity)  # one listing
    done = {}
    for k in range(plan.num_shards):
        if record_name(k) not in sizes:
            continue
        try:
            record = (out / record_name(k)).read_json()
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue  # not a record this tool wrote: the shard is made again
        if (
            record.get("identity") == want
            and record.get("name") == plan.name(k)
            and sizes.get(plan.name(k)) == record.get("bytes")
        ):
            done[k] = record
    return done


def write_manifest(
    out: Location, job: PrepareJob, plan: ShardPlan, classes: list[str], records: dict[int, dict]
) -> dict:
    """The manifest, written last: its presence says every shard is finished."""
    import PIL

    missing = [plan.name(k) for k in range(plan.num_shards) if k not in records]
    if missing:
        raise UserError(
            f"{len(missing)} shard(s) are not finished ({missing[0]}, ...): run the same command again to make them"
        )
    shards = [{key: records[k][key] for key in ("name", "samples", "bytes", "sha256")} for k in range(plan.num_shards)]
    manifest = {
        **job.identity(len(plan.order)),
        "source": job.source,
        "classes": list(classes),
        "num_shards": plan.num_shards,
        "pattern": plan.pattern,
        "shards": shards,
        "versions": {"pillow": PIL.__version__},
    }
    (out / MANIFEST).write_json(manifest)
    return manifest


@dataclass
class PrepareResult:
    """What a run of ``prepare`` did, and the manifest it ended with."""

    written: int  # shards written by this run
    skipped: int  # shards an earlier run had finished
    manifest: dict
    already: bool  # the output was finished before this run: nothing was written


def prepare(job: PrepareJob, dataset: ImageDataset, write_shards=None, note: str | None = None) -> PrepareResult:
    """Claim the output, write its unfinished shards, then the manifest; resumable (see the module docstring).

    ``write_shards(pending, plan)`` writes the shards numbered ``pending`` and returns their records by number
    (the command passes Ray actors'); default: in this process, one after the other. ``note`` is logged once
    the output is claimed, when there is work to do.
    """
    out = Location(job.out)
    plan, identity = ShardPlan.of(len(dataset), job.settings), job.identity(len(dataset))
    if claim_output(out, identity, job.source):
        return PrepareResult(0, plan.num_shards, read_json(out / MANIFEST), already=True)
    with WriterLock(out / RECORDS / LOCK, f"{out}", busy="is being prepared"):
        return _write_rest(out, job, dataset, plan, identity, write_shards, note)


def _write_rest(
    out: Location,
    job: PrepareJob,
    dataset: ImageDataset,
    plan: ShardPlan,
    identity: dict,
    write_shards,
    note: str | None,
) -> PrepareResult:
    """The claimed output's unfinished shards, then its manifest: under the output's lock."""
    if note:
        log.info(note)
    # a killed run's unfinished shards (object stores get whole uploads); under the lock, every one is stale
    if out.is_local:
        remove_stale_temp_files(out, older_than=0.0)
    done = finished_shards(out, plan, identity)
    pending = [k for k in range(plan.num_shards) if k not in done]
    log.info(
        "prepare %s -> %s: %d samples in %d shards, %d already finished",
        job.source,
        out,
        len(dataset),
        plan.num_shards,
        len(done),
    )
    if pending:
        done.update(
            write_shards(pending, plan) if write_shards is not None else ShardMaker(job, dataset).write_all(pending)
        )
    manifest = write_manifest(out, job, plan, dataset.classes, done)
    return PrepareResult(len(pending), plan.num_shards - len(pending), manifest, already=False)
