"""Slides per minute of `preprocess --cluster` on this machine, and the scheduler's cost per slide.

Usage::

    .venv/bin/python benchmarks/cluster.py                  # 8 slides, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/cluster.py --slides 16 --width 6000 --height 4800

Two layouts of the same cores, side by side on the same slides: 1 worker process x 2 threads and
2 worker processes x 1 thread (``--cluster local:1x2`` and ``local:2x1``). Each layout starts its
LocalCluster, warms every worker up on one slide (the encoder is built once per worker process
and kept), then preprocesses all slides into a fresh folder; the rate is slides over that
wall time. The scheduler's overhead is measured with the same client loop
(:func:`zoompipe.cluster.run_slides`) on tasks that do nothing: submit, schedule, run, gather and
record, per slide.

How it scales to 100 nodes. Shared: the output folder (each slide writes its own files under
temporary names, one lock and one status record; the client rebuilds ``status.csv`` at most
every 2 s) and the slides' storage. Not shared: each worker opens its slides itself and keeps
its own encoder, so nothing large crosses the network but the slide's own reads and its
outputs; the scheduler sees one task and a record of a few hundred bytes per slide (about a
second of scheduler time per thousand slides at the overhead measured here, against minutes of
work per real slide). The bottleneck moves to the slides' storage first (every worker reads
whole regions of its slides: 100 GPU workers at a few hundred patches per second each pull
several GB/s from a shared file system), then to the output file system's metadata server
(creates, renames and locks: about ten small-file operations per slide). The scheduler is not
the limit at one task per slide; TRIDENT's answer to slow storage, copying each slide to a
local disk first, applies unchanged inside a task.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from zoompipe.environment import apply_speed_settings

apply_speed_settings()

from zoompipe.cluster import ClusterSpec, connect, run_slides  # noqa: E402
from zoompipe.preprocess import PreprocessConfig, preprocess_slides  # noqa: E402
from zoompipe.run_status import SlideStatus  # noqa: E402
from zoompipe.slide import SlideSource, slide_source  # noqa: E402
from zoompipe.synthetic import write_synthetic_slide  # noqa: E402


def noop(source: SlideSource, wait: bool) -> SlideStatus:
    return SlideStatus(source.slide_id, source.name, "ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=8, help="slides to preprocess per layout")
    parser.add_argument("--width", type=int, default=4000, help="slide width in pixels at 0.5 mpp")
    parser.add_argument("--height", type=int, default=3200, help="slide height in pixels at 0.5 mpp")
    parser.add_argument("--noop-tasks", type=int, default=500, help="empty tasks for the scheduler overhead")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="zoompipe-cluster-bench-"))
    os.environ.setdefault("ZOOMPIPE_CACHE_DIR", str(root / "cache"))
    slides = [root / "slides" / f"s{i:03d}.svs" for i in range(args.slides + 2)]
    slides[0].parent.mkdir(parents=True)
    for seed, path in enumerate(slides):
        write_synthetic_slide(path, args.width, args.height, mpp=0.5, seed=seed)
    warmup, timed = slides[:2], slides[2:]
    config = PreprocessConfig(magnifications=[1.25, 2.5, 10.0], precision="fp32")
    cores = len(os.sched_getaffinity(0))
    print(f"{args.slides} slides of {args.width} x {args.height} px at 0.5 mpp, cascade 1.25x/2.5x/10x, "
          f"efficientnet_lite0 fp32, {cores} cores, Python {sys.version.split()[0]}")
    print(f"{'layout':<24}{'seconds':>10}{'slides/min':>12}{'patches':>10}")
    for workers, threads in ((1, 2), (2, 1)):
        with connect(ClusterSpec(workers=workers, threads=threads)) as (client, _):
            preprocess_slides(warmup, root / f"warm_{workers}x{threads}", config, progress=False, cluster=client)
            start = time.perf_counter()
            rows = preprocess_slides(timed, root / f"out_{workers}x{threads}", config, progress=False,
                                     cluster=client)
            seconds = time.perf_counter() - start
        assert all(r.status == "ok" for r in rows), [r.error for r in rows if r.status != "ok"]
        patches = sum(int(part.split(":")[1]) for r in rows for part in r.detail.split(";"))
        print(f"{f'{workers} worker x {threads} thread':<24}{seconds:>10.1f}{len(rows) / seconds * 60:>12.2f}"
              f"{patches:>10}")

    names = [slide_source(root / "noop" / f"n{i:05d}.svs") for i in range(args.noop_tasks)]
    with connect(ClusterSpec(workers=2, threads=1)) as (client, _):
        run_slides(client, noop, names[:20], lambda p: {}, lambda p, r: None, lambda p, e: None, progress=False)
        start = time.perf_counter()
        run_slides(client, noop, names, lambda p: {}, lambda p, r: None, lambda p, e: None, progress=False)
        per_task = (time.perf_counter() - start) / len(names)
    print(f"scheduler overhead: {per_task * 1000:.1f} ms per slide ({len(names)} empty tasks on 2 workers; "
          f"target under 50 ms)")
    print(f"files kept in {root}")


if __name__ == "__main__":
    main()
