"""Loader speed: the replay renderer against timm's training transforms and Mixup, on the same JPEG folder.

One run, side by side, on ImageNet-sized JPEGs (500x375, made here from scikit-learn's two sample
photos by random crops, resizes, flips and colour shifts, class-per-folder):

  timm    ``create_transform(224, is_training=True, auto_augment="rand-m7-mstd0.5")`` on
          ``timm.data.ImageDataset(folder)``, a shuffled DataLoader, and with mixing on
          ``timm.data.Mixup(mixup_alpha=0.1, cutmix_alpha=1.0)`` on each batch (timm's
          ``train.py`` without the prefetcher): normalised float32 batches.
  replay  the VanillaKD A2 views (``configs/vanillakd_a2.yaml``: crop, flip, rand-m7-mstd0.5,
          mixup 0.1 / cutmix 1.0) drawn on the fly (``DrawnViews``), shuffled and batched as
          distillation does, rendered by ``ViewRenderer`` (one decode and one render per image,
          mates mixed from the two renders): uint8 batches, which the student loop moves to
          its device and normalises there. Without mixing: the same recipe with both alphas 0.
  replay+norm  the same, normalised to float32 in the main process (what a CPU-only student
          loop pays, and the same float32 batches timm's loader gives).

With ``--repeats R`` both sides draw repeated augmentation: timm's loader through its
``RepeatAugSampler(num_repeats=R)`` (each copy of a sample loaded, so decoded, on its own), the replay
with R views of each sample of an epoch's blocks, as ``distill --repeats R`` reads them (without
mixing, a sample's views share one batch and one decode; with mixing too under ``--shared-partner``,
where the plan pairs a sample's R views with one partner: ``mix_pair_views``). A decode-only row times the replay's own
JPEG decode of every image in one process (``FolderDataset.image``): the table's last column is the
replay's CPU time per view over it (the decode limit; 1.0 would be a free augmentation).

With ``--prepared-max-side N`` (320 is the usual choice) a copy of the folder is first prepared as shuffled
webdataset shards with every image's longer side at most N (``pipeline prepare --max-side N``, timed), and
a fourth loader, ``replay@N``, replays the same views from those shards (smaller JPEGs, read in one pass
per unit): its rows compare it with timm's loader on the original JPEGs, and its decode-only time is printed.

Each is measured with the views made in the main process (``--workers 0``) and with loader
workers; rounds interleave every configuration, so machine noise hits all alike, and medians are
quoted. Each measurement is one epoch over the folder; the first batch (worker start-up) is not
timed. The targets: every replay row >= 2x timm's views/s; replay CPU ms per view / (decode ms / R + timm's own augmentation
ms for the same views, measured apart: ``timm_augment_ms``) <= 1.2, the replay's overhead over decoding plus augmenting.

Run from the repository root (about 3 minutes on 2 CPU cores with the defaults):

    .venv/bin/python benchmarks/loader.py
    .venv/bin/python benchmarks/loader.py --images 800 --rounds 7 --workers 0 4
    .venv/bin/python benchmarks/loader.py --repeats 3        # timm's RepeatAugSampler against the replay's repeats
    .venv/bin/python benchmarks/loader.py --prepared-max-side 320   # also replay from shards prepared at max side 320
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=400, help="JPEGs in the folder (default: 400)")
    p.add_argument("--classes", type=int, default=10, help="class folders (default: 10)")
    p.add_argument(
        "--folder", help="where the JPEGs are made (kept; made again only if missing); default: a temporary folder"
    )
    p.add_argument("--size", type=int, default=224, help="view size (default: 224)")
    p.add_argument("--batch-size", type=int, default=64, help="views per batch, even for timm's Mixup (default: 64)")
    p.add_argument(
        "--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure (default: 0 2)"
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are quoted (default: 5)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads in the main process (default: 1, see distill_cost.py)"
    )
    p.add_argument(
        "--recipe", default="configs/vanillakd_a2.yaml", help="the replay's view recipe (its views: section)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="repeated augmentation on both sides: timm's RepeatAugSampler, the replay's repeats (default: 1)",
    )
    p.add_argument(
        "--shared-partner",
        action="store_true",
        help="with --repeats R, the replay's mixing plan pairs a sample's R views with one partner (mix_pair_views R), as timm's "
        "RepeatAugSampler with batch mixing does on one process: a sample's and its partner's views render from one decode each",
    )
    p.add_argument(
        "--interpolation",
        choices=("bilinear", "random"),
        default="bilinear",
        help="resampling of timm's crop and of both sides' RandAugment ops: bilinear (create_transform's default) or random "
        "(timm train.py's default, bilinear or bicubic per call; the replay's crops stay bilinear) (default: bilinear)",
    )
    p.add_argument(
        "--prepared-max-side",
        type=int,
        default=0,
        help="also replay from a copy prepared as shards with this max side (pipeline prepare --max-side), against timm on the originals (default: 0, off)",
    )
    return p.parse_args()


# -- the images --------------------------------------------------------------------------------


def make_jpegs(root: Path, count: int, classes: int, seed: int = 0) -> Path:
    """``count`` distinct 500x375 JPEGs in ``classes`` folders, cut from scikit-learn's sample photos."""
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    marker = root / f".made-{count}-{classes}-{seed}"
    if marker.exists():
        return root
    photos = [Image.fromarray(p) for p in load_sample_images().images]  # china.jpg, flower.jpg: 640x427
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        W, H = photo.size
        # A random crop of 40-100% of the side, resized to ImageNet's most common 500x375 (or 375x500).
        frac = rng.uniform(0.4, 1.0)
        w, h = int(W * frac), int(H * frac)
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        size = (500, 375) if rng.random() < 0.8 else (375, 500)
        image = photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img{i:05d}.jpg", quality=int(rng.integers(75, 96)))
    marker.touch()
    return root


# -- the two loaders ---------------------------------------------------------------------------


def timm_epoch(
    folder: Path,
    size: int,
    batch_size: int,
    workers: int,
    mixing: bool,
    seed: int,
    interpolation: str,
    repeats: int = 1,
) -> tuple[float, float]:
    """One epoch of timm's training loader: ``_timed``'s (views/s, CPU ms per view)."""
    from timm.data import ImageDataset, Mixup, create_transform
    from timm.data.distributed_sampler import RepeatAugSampler

    transform = create_transform(size, is_training=True, auto_augment="rand-m7-mstd0.5", interpolation=interpolation)
    dataset = ImageDataset(str(folder), transform=transform)
    mixup = Mixup(mixup_alpha=0.1, cutmix_alpha=1.0, num_classes=len(dataset.reader.class_to_idx)) if mixing else None
    sampler = (
        RepeatAugSampler(dataset, num_replicas=1, rank=0, num_repeats=repeats, selected_round=0)
        if repeats > 1
        else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers else None,
    )
    return _timed(((x, y) if mixup is None else mixup(x, y) for x, y in loader), batch_size)


def replay_epoch(
    folder: Path,
    recipe,
    size: int,
    batch_size: int,
    workers: int,
    seed: int,
    cpu_normalize: bool = False,
    repeats: int = 1,
    source: str | None = None,
) -> tuple[float, float]:
    """One epoch of the replay loader (``ReplayLoader``, what `pipeline distill` and ``stages.loader`` iterate), uint8 batches
    or normalised there: ``_timed``'s (views/s, CPU ms per view).

    ``source``: another dataset to replay from (prepared shards, ``wds:...``) instead of the folder."""
    from stages.data.datasets import open_dataset
    from stages.data.folder_dataset import FolderDataset
    from stages.data.replay import DrawnViews
    from stages.data.views import ViewPlan
    from stages.training.loader import ReplayLoader

    data = open_dataset(source) if source else FolderDataset(str(folder))
    plan = ViewPlan(recipe, seed=seed)
    # repeats: an epoch takes 1/R of the blocks
    views = DrawnViews(plan, data, num_views=repeats, block=1024 if repeats == 1 else 64)
    norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if cpu_normalize else None
    loader = ReplayLoader(
        data, plan, views, batch_size, size=size, seed=seed, repeats=repeats, workers=workers, normalize=norm
    )
    return _timed((batch.images for batch in loader), batch_size)


def timm_augment_ms(
    folder: Path, size: int, batch_size: int, mixing: bool, interpolation: str, images: int = 200
) -> float:
    """CPU milliseconds per view of timm's augmentation alone: ``create_transform(..., use_prefetcher=True)`` (crop, flip,
    RandAugment, to a uint8 tensor, as the replay hands out) on images decoded beforehand, plus ``Mixup`` on each batch."""
    from PIL import Image
    from timm.data import Mixup, create_transform

    transform = create_transform(
        size, is_training=True, auto_augment="rand-m7-mstd0.5", interpolation=interpolation, use_prefetcher=True
    )
    paths = sorted(folder.rglob("*.jpg"))[:images]
    decoded = [Image.open(p).convert("RGB") for p in paths]
    for im in decoded:
        im.load()
    mixup = Mixup(mixup_alpha=0.1, cutmix_alpha=1.0, num_classes=10) if mixing else None
    start = time.process_time()
    for lo in range(0, len(decoded) - batch_size + 1, batch_size):
        x = torch.stack([transform(im) for im in decoded[lo : lo + batch_size]])
        if mixup is not None:
            mixup(x.float(), torch.zeros(batch_size, dtype=torch.long))
    done = (len(decoded) // batch_size) * batch_size
    return 1000 * (time.process_time() - start) / max(done, 1)


def _timed(batches, batch_size: int) -> tuple[float, float]:
    """(views per second after the first batch, CPU milliseconds per view over the whole epoch, loader workers included)."""
    import resource

    cpu0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    it = iter(batches)
    next(it)  # workers start, first batch: not timed
    start, n = time.perf_counter(), 0
    for _ in it:
        n += batch_size
    wall = time.perf_counter() - start
    del it  # the loader's workers exit (and are waited for) here, so their CPU time is counted
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (
        time.process_time() - cpu0[0] + (children.ru_utime + children.ru_stime) - (cpu0[1].ru_utime + cpu0[1].ru_stime)
    )
    return n / wall, 1000 * cpu / (n + batch_size)


NAMES = ("timm", "replay", "replay+norm")
PREPARED = "replay@prepared"  # replay from shards made by `pipeline prepare --max-side` (``--prepared-max-side``)


def decode_ms(folder: Path, source: str | None = None) -> float:
    """CPU milliseconds to decode one JPEG of the folder (or of ``source``), as the replay decodes it, in one process."""
    from stages.data.datasets import open_dataset
    from stages.data.folder_dataset import FolderDataset

    data = open_dataset(source) if source else FolderDataset(str(folder))
    blobs = data.encoded(np.arange(len(data)))  # shards: read first, so that only decoding is timed
    start = time.process_time()
    for i in range(len(data)):
        data.image(i) if blobs is None else data.decode(i, blobs[i])
    return 1000 * (time.process_time() - start) / len(data)


def prepare_copy(folder: Path, out: Path, max_side: int) -> tuple[str, float]:
    """The folder prepared as shards at ``max_side`` (what `pipeline prepare --max-side` writes): (its wds: source, images/s)."""
    from stages.data.prepare import PrepareJob, PrepareSettings, open_source, prepare

    data = open_source(f"folder:{folder}")
    start = time.perf_counter()
    manifest = prepare(
        PrepareJob(
            f"folder:{folder}", str(out), PrepareSettings(max_side=max_side, shard_size=100), data.fingerprint()
        ),
        data,
    ).manifest
    return f"wds:{out}/{manifest['pattern']}", len(data) / (time.perf_counter() - start)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from pipeline.settings import config
    from stages.data.views import ViewRecipe

    views = {**config.load_yaml(args.recipe)["views"], "ra_interpolation": args.interpolation}
    shared = {"mix_pair_views": args.repeats} if args.shared_partner else {}
    recipes = {
        True: ViewRecipe.from_dict({**views, **shared}),
        False: ViewRecipe.from_dict({**views, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpegs(Path(args.folder or tmp), args.images, args.classes)
        print(
            f"{args.images} JPEGs 500x375 in {args.classes} folders at {folder}; views {args.size} px, batches of {args.batch_size}, repeats {args.repeats}{' (shared partners)' if args.shared_partner else ''}, "
            f"interpolation {args.interpolation}, {args.rounds} rounds; torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.machine()})"
        )
        names, prepared = NAMES, None
        if args.prepared_max_side:
            prepared, rate = prepare_copy(folder, Path(tmp) / "prepared", args.prepared_max_side)
            names = (*NAMES, PREPARED)
            print(
                f"prepared a copy at max side {args.prepared_max_side}: {rate:,.0f} images/s in one process ({prepared})"
            )
        configs = [(mixing, workers) for mixing in (True, False) for workers in args.workers]
        wall: dict[tuple, list[float]] = {}
        cpu: dict[tuple, list[float]] = {}
        decodes: list[float] = []
        prepared_decodes: list[float] = []
        augments: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for mixing, workers in configs:
                for name in names:
                    if name == "timm":
                        rate, ms = timm_epoch(
                            folder, args.size, args.batch_size, workers, mixing, r, args.interpolation, args.repeats
                        )
                    else:
                        source = prepared if name == PREPARED else None
                        rate, ms = replay_epoch(
                            folder,
                            recipes[mixing],
                            args.size,
                            args.batch_size,
                            workers,
                            r,
                            name == "replay+norm",
                            args.repeats,
                            source,
                        )
                    wall.setdefault((name, mixing, workers), []).append(rate)
                    cpu.setdefault((name, mixing, workers), []).append(ms)
            decodes.append(decode_ms(folder))
            for mixing in augments:
                augments[mixing].append(timm_augment_ms(folder, args.size, args.batch_size, mixing, args.interpolation))
            if prepared:
                prepared_decodes.append(decode_ms(folder, prepared))
            print(
                f"  round {r + 1}/{args.rounds} (replay / timm, views/s): "
                + ", ".join(
                    f"{'mix' if m else 'plain'}/w{w} {wall['replay', m, w][-1] / wall['timm', m, w][-1]:.2f}x"
                    for m, w in configs
                ),
                flush=True,
            )

    def ratio(table, name, key, inverse=False) -> float:
        # The median of per-round ratios: the two were measured next to each other in time.
        pairs = zip(table[(name,) + key], table[("timm",) + key])
        return statistics.median([(b / a) if inverse else (a / b) for a, b in pairs])

    med = statistics.median
    print()
    print(
        "| mixing | loader workers | timm views/s | replay views/s | replay / timm | replay+norm views/s | replay+norm / timm |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in configs:
        mixing, workers = key
        print(
            f"| {'mixup 0.1 / cutmix 1.0' if mixing else 'off'} | {workers or 'none (1 process)'} | {med(wall[('timm',) + key]):.0f} | "
            f"{med(wall[('replay',) + key]):.0f} | **{ratio(wall, 'replay', key):.2f}x** | {med(wall[('replay+norm',) + key]):.0f} | {ratio(wall, 'replay+norm', key):.2f}x |"
        )
    print()
    print(
        "CPU time per view (main process and loader workers, whole epoch); the ratio is timm's CPU time over the replay's:"
    )
    print()
    decode = med(decodes)
    print(
        f"| mixing | loader workers | timm ms/view | replay ms/view | replay+norm ms/view | timm / replay | timm / replay+norm | replay / decode-only ({decode:.2f} ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key in configs:
        mixing, workers = key
        print(
            f"| {'mixup 0.1 / cutmix 1.0' if mixing else 'off'} | {workers or 'none (1 process)'} | {med(cpu[('timm',) + key]):.2f} | "
            f"{med(cpu[('replay',) + key]):.2f} | {med(cpu[('replay+norm',) + key]):.2f} | {ratio(cpu, 'replay', key, True):.2f}x | "
            f"{ratio(cpu, 'replay+norm', key, True):.2f}x | {med(cpu[('replay',) + key]) / decode:.2f} |"
        )
    if prepared_decodes:
        print(
            f"\nReplay from shards prepared at max side {args.prepared_max_side} ({PREPARED}, uint8 batches) against timm on the original JPEGs; "
            f"decode-only {med(prepared_decodes):.2f} ms per image against {decode:.2f} ms for the originals:"
        )
        print()
        print(
            f"| mixing | loader workers | timm views/s (originals) | replay views/s (originals) | {PREPARED} views/s | {PREPARED} / timm | {PREPARED} / replay | "
            f"CPU ms/view timm / {PREPARED} |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for key in configs:
            mixing, workers = key
            vs_replay = statistics.median([a / b for a, b in zip(wall[(PREPARED,) + key], wall[("replay",) + key])])
            print(
                f"| {'mixup 0.1 / cutmix 1.0' if mixing else 'off'} | {workers or 'none (1 process)'} | {med(wall[('timm',) + key]):.0f} | "
                f"{med(wall[('replay',) + key]):.0f} | {med(wall[(PREPARED,) + key]):.0f} | **{ratio(wall, PREPARED, key):.2f}x** | {vs_replay:.2f}x | "
                f"{med(cpu[('timm',) + key]):.2f} / {med(cpu[(PREPARED,) + key]):.2f} |"
            )
    print()
    print(
        f"The decode limit: the replay's CPU time per view against what decoding (once per sample: {decode:.2f} ms / R, R = {args.repeats}) "
        "plus timm's own augmentation of the same views (decoded beforehand, measured apart in this run) costs:"
    )
    print()
    print("| mixing | loader workers | replay ms/view | decode / R + timm augmentation ms | ratio (target <= 1.2) |")
    print("|---|---|---|---|---|")
    limits = {}
    for key in configs:
        mixing, workers = key
        floor = decode / args.repeats + med(augments[mixing])
        limits[key] = med(cpu[("replay",) + key]) / floor
        print(
            f"| {'mixup 0.1 / cutmix 1.0' if mixing else 'off'} | {workers or 'none (1 process)'} | {med(cpu[('replay',) + key]):.2f} | "
            f"{decode / args.repeats:.2f} + {med(augments[mixing]):.2f} = {floor:.2f} | **{limits[key]:.2f}** |"
        )
    worst = min(ratio(wall, name, key) for name in names if name != "timm" and name != "replay+norm" for key in configs)
    print(
        f"\ntarget: every replay row >= 2x timm (views/s): {'met' if worst >= 2 else 'NOT met'} (worst {worst:.2f}x); "
        f"replay / decode limit <= 1.2: {'met' if max(limits.values()) <= 1.2 else 'NOT met'} (worst {max(limits.values()):.2f})"
    )


if __name__ == "__main__":
    main()
