"""``zoompipe synth``: a labelled cohort of synthetic lesion slides, to try the pipeline without data."""

from __future__ import annotations

from pathlib import Path

import click

from zoompipe.synthetic import GRADE_NAMES, write_cohort


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "count", type=int, default=60, help="Number of slides (classes alternate).")
@click.option("--classes", "n_classes", type=click.IntRange(2, len(GRADE_NAMES)), default=3,
              help="2: normal/malignant; 3: normal/atypical/malignant.")
@click.option("--width", type=int, default=30720, help="Level-0 width in pixels.")
@click.option("--height", type=int, default=24576, help="Level-0 height in pixels.")
@click.option("--mpp", type=float, default=0.5, help="Level-0 microns per pixel (0.5 = 20x).")
@click.option("--seed", type=int, default=0, help="Seed of the whole cohort.")
@click.option("--jobs", type=int, default=1, help="Slides written in parallel.")
def synth_command(out_dir: str, count: int, n_classes: int, width: int, height: int, mpp: float, seed: int,
                  jobs: int) -> None:
    """Write a cohort of Aperio-style SVS slides whose class shows only at high magnification.

    Every slide has tissue and a few lesions (0.5-2 mm) that look denser at 1.25x in every class;
    the class is the size and shape of the nuclei inside the lesions, visible at 10x. Writes
    OUT_DIR/slides/*.svs, OUT_DIR/regions/*.png (lesion labels at 4 um/px), labels.csv and
    splits.csv (stratified train/val/test). Existing slides are kept.
    """
    rows = write_cohort(Path(out_dir), count, seed=seed, width=width, height=height, mpp=mpp,
                        n_classes=n_classes, jobs=jobs)
    for row in rows:
        click.echo(f"{row['path']}  {row['label']}  {row['split']}")
