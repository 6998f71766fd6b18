"""``zoompipe info``: what a slide is and what resolution it will be read at."""

from __future__ import annotations

import json

import click

from zoompipe.errors import ZoompipeError


@click.command("info")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide"]), default="auto",
              help="Slide library; auto prefers OpenSlide and falls back to tiffslide.")
@click.option("--mpp", type=float, default=None, help="Level-0 microns per pixel, overriding the metadata.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per slide, for machines.")
def info_command(slides: tuple[str, ...], backend: str, mpp: float | None, as_json: bool) -> None:
    """Print backend, vendor, size, pyramid levels, mpp (and its source) and magnification of SLIDES.

    SLIDES are files or URLs (https://..., s3://bucket/key, any fsspec URL), which are read with
    range requests; for a URL the bytes and requests that opening it took are printed too.
    Every slide is reported; the exit status is 1 if any could not be opened.
    """
    from zoompipe.slide import open_slide

    failed = 0
    for path in slides:
        try:
            with open_slide(path, backend=backend, mpp=mpp) as slide:
                info = slide.info()
        except ZoompipeError as err:
            failed += 1
            click.echo(f"error: {err}", err=True)
            continue
        if as_json:
            click.echo(json.dumps(info))
            continue
        w, h = info["dimensions"]
        click.echo(f"{info['path']}\n  backend   {info['backend']} ({info['vendor']})\n"
                   f"  size      {w} x {h} px\n"
                   f"  mpp       {info['mpp']:g} um/px (from {info['mpp_source']})\n"
                   f"  power     {info['magnification']:g}x at this mpp"
                   + (f", objective {info['objective_power']:g}x" if info["objective_power"] else ""))
        for level, ((lw, lh), ds) in enumerate(zip(info["level_dimensions"], info["level_downsamples"])):
            click.echo(f"  level {level}   {lw} x {lh} px, downsample {ds:g}, {info['mpp'] * ds:.4g} um/px")
        if info["transfer"]:
            t = info["transfer"]
            click.echo(f"  remote    {t['bytes_fetched'] / 2**20:.2f} of {t['file_size'] / 2**20:.2f} MiB fetched "
                       f"in {t['requests']} requests to open it")
    if failed:
        raise SystemExit(1)
