"""Option parsers shared by several commands."""

from __future__ import annotations

import click


def parse_magnifications(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """``"1.25,2.5,10"`` -> ``[1.25, 2.5, 10.0]``, increasing with integer ratios."""
    if value is None:
        return None
    try:
        mags = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not mags or any(m <= 0 for m in mags):
        raise click.BadParameter("give at least one positive magnification")
    for low, high in zip(mags, mags[1:]):
        ratio = high / low
        if ratio <= 1 or abs(ratio - round(ratio)) > 1e-6:
            raise click.BadParameter(f"{high:g}/{low:g} is not an integer ratio above 1")
    return mags


def _stack(*decorators):
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


#: Where slides come from and how their resolution is known (preprocess, predict).
slide_options = _stack(
    click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto",
                 help="Slide library; auto prefers OpenSlide and falls back to tiffslide."),
    click.option("--mpp", type=float, default=None, help="Level-0 microns per pixel for slides that lack it."),
    click.option("--mpp-csv", type=click.Path(exists=True, dir_okay=False), default=None,
                 help="CSV slide_id,mpp of per-slide overrides."),
)

#: Where and how patches are embedded (preprocess, predict).
compute_options = _stack(
    click.option("--device", default="cpu", help="cpu, cuda, cuda:1 ..."),
    click.option("--runtime", type=click.Choice(["auto", "torch", "openvino"]), default="auto",
                 help="Encoder runtime; auto: OpenVINO for fp32 on CPU, torch otherwise."),
    click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Patches per encoder batch."),
    click.option("--workers", type=click.IntRange(min=1), default=2,
                 help="Patch reader threads, each with its own slide handle."),
)

#: The user-drawn tissue masks of a run (preprocess, predict, heatmap).
mask_dir_option = click.option(
    "--mask-dir", type=click.Path(exists=True, file_okay=False), default=None,
    help="Folder of <slide_id>.geojson (QuPath) or <slide_id>.png tissue masks used instead of segmenting; "
         "predict needs the folder the run was preprocessed with.")

#: Where slides are processed (preprocess, predict); parsed by zoompipe.cluster.parse_cluster.
cluster_option = click.option(
    "--cluster", default=None, metavar="SPEC",
    help="Run one task per slide on Dask: local:N (N worker processes, cores split between them; local:NxT for "
         "T threads each), tcp://HOST:8786 or a scheduler file (a running cluster whose workers see OUT at the "
         "same path). [default: this process alone]")
