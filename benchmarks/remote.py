"""`zoompipe predict` on the standard slide served over loopback HTTP: the share of its bytes fetched.

The standard slide (65536 x 49152 px, JPEG tiles; see predict_speed.py) is served by a real HTTP
server on 127.0.0.1 (aiohttp's static file response, Range requests, tests/http_server.py) whose
access log counts every request and every body byte. Each run is a separate `zoompipe predict`
process, side by side in alternating rounds:

- ZoomMIL 1.25x -> 2.5x -> 10x, K = 12, from the local file and from the URL;
- ABMIL at 10x from the URL (it reads every 10x child of every 1.25x tissue patch), for
  comparison; ``--abmil-local`` also times it on the local file (another minute or two).

Usage: python benchmarks/remote.py [--rounds 2] [--runtime auto] [--no-abmil] [--abmil-local]

Prints, per run, the wall seconds, patches embedded, and for the URL runs the bytes fetched as a
share of the file, the requests made and the retries (the client's count, from the prediction
JSON), beside the bytes and requests in the server's log.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from predict_speed import make_run, run_predict, standard_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from http_server import SlideServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--no-abmil", action="store_true", help="Leave out ABMIL 10x over HTTP.")
    parser.add_argument("--abmil-local", action="store_true", help="Also time ABMIL 10x on the local file.")
    args = parser.parse_args()
    slide = standard_slide()
    size = slide.stat().st_size
    rows: dict[str, list[tuple[float, dict, list[dict]]]] = {}
    with tempfile.TemporaryDirectory() as tmp, SlideServer(slide.parent, Path(tmp) / "access.log") as server:
        url = server.url(slide.name)
        runs = {"ZoomMIL 1.25x->2.5x->10x, K=12": make_run(Path(tmp) / "zoommil", [1.25, 2.5, 10.0], k=12),
                "ABMIL 10x": make_run(Path(tmp) / "abmil", [10.0], k=12)}
        plan = [("ZoomMIL 1.25x->2.5x->10x, K=12", "local"), ("ZoomMIL 1.25x->2.5x->10x, K=12", "http")]
        plan += [] if args.no_abmil else [("ABMIL 10x", "http")]
        plan += [("ABMIL 10x", "local")] if args.abmil_local else []
        for round_ in range(args.rounds):
            for method, where in plan:
                if method.startswith("ABMIL") and round_:
                    continue  # one round: its share does not change, and it takes minutes
                start = len(server.log())
                seconds, _, prediction = run_predict(url if where == "http" else slide, runs[method],
                                                     Path(tmp) / f"out_{len(rows)}", args.runtime)
                rows.setdefault(f"{method} | {where}", []).append((seconds, prediction, server.log()[start:]))
    print(f"standard slide {slide.name}, {size / 2**20:.1f} MiB, served over loopback HTTP; "
          f"median wall seconds of {args.rounds} alternating rounds (ABMIL: 1)")
    print(f"{'method':32s} {'from':>5s} {'wall s':>7s} {'patches':>8s} {'MiB fetched':>12s} {'share':>7s} "
          f"{'requests':>9s} {'retries':>8s} {'server MiB':>11s} {'server req':>11s}")
    for key, results in rows.items():
        method, where = key.split(" | ")
        seconds = statistics.median(r[0] for r in results)
        prediction, log = results[-1][1], results[-1][2]
        line = f"{method:32s} {where:>5s} {seconds:7.2f} {prediction['patches_embedded']:8d}"
        transfer = prediction.get("transfer")
        if transfer:
            served = sum(r["body_bytes"] for r in log)
            line += (f" {transfer['bytes_fetched'] / 2**20:12.2f} {transfer['share']:7.2%} {transfer['requests']:9d}"
                     f" {transfer['retries']:8d} {served / 2**20:11.2f} {len(log):11d}")
        print(line)


if __name__ == "__main__":
    main()
