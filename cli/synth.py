"""``zoompipe synth``: write synthetic pyramidal slides to try the pipeline without real data."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from zoompipe.synthetic import write_synthetic_slide


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "count", type=int, default=1, help="Number of slides.")
@click.option("--width", type=int, default=16384, help="Level-0 width in pixels.")
@click.option("--height", type=int, default=12288, help="Level-0 height in pixels.")
@click.option("--mpp", type=float, default=0.25, help="Level-0 microns per pixel (0.25 = 40x).")
@click.option("--seed", type=int, default=0, help="Seed of the first slide; slide i uses seed + i.")
def synth_command(out_dir: str, count: int, width: int, height: int, mpp: float, seed: int) -> None:
    """Write COUNT Aperio-style SVS slides of tissue-like blobs on glass into OUT_DIR.

    Files are named synthetic_000.svs, synthetic_001.svs, ...; existing files are kept.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(count), desc="slides", unit="slide", disable=count == 1):
        path = out / f"synthetic_{index:03d}.svs"
        if not path.exists():
            write_synthetic_slide(path, width, height, mpp=mpp, seed=seed + index)
        click.echo(str(path))
