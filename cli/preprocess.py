"""``zoompipe preprocess``: slides to feature files, masks and GeoJSON."""

from __future__ import annotations

import click

from zoompipe.encoders import DEFAULT_ENCODER, list_encoders
from zoompipe.encoders.config import PRECISIONS
from zoompipe.tissue import PRESETS, get_params

from .options import cluster_option, compute_options, mask_dir_option, parse_magnifications, slide_options


@click.command("preprocess")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--magnifications", default="1.25,2.5,10", callback=parse_magnifications,
              help="Cascade, base first, integer ratios; '1.25' alone for a single scale.")
@click.option("--patch-size", type=click.IntRange(min=1), default=256,
              help="Patch side in pixels at every magnification.")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.1,
              help="Tissue fraction a base patch needs (with --children tissue, a last-magnification child too).")
@click.option("--children", type=click.Choice(["tissue", "all"]), default="tissue",
              help="At the last magnification, keep only children with --min-tissue (tissue) or every child "
                   "of a base tissue patch (all).")
@click.option("--tissue-preset", type=click.Choice(sorted(PRESETS)), default="default",
              help="Tissue segmentation preset.")
@click.option("--mask-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resolution of the tissue mask [default: preset's].")
@mask_dir_option
@click.option("--encoder", default=DEFAULT_ENCODER,
              help=f"Patch encoder: {', '.join(list_encoders())} (timm:hf-hub:org/name too; see zoompipe encoders).")
@click.option("--weights", "--encoder-weights", "weights", type=click.Path(exists=True), default=None,
              help="Encoder weights: a file (safetensors or torch), or a folder holding the hub's file "
                   "(a snapshot or a Hugging Face cache) [default: the encoder's own; see zoompipe encoders].")
@compute_options
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32; int8 (opt-in, CPU, needs nncf): "
                   "OpenVINO int8, faster, features not equal to fp32.")
@slide_options
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs exist.")
@cluster_option
def preprocess_command(slides, out_dir, magnifications, patch_size, min_tissue, children, tissue_preset, mask_mpp, mask_dir,
                       encoder, weights, device, runtime, precision, batch_size, workers, backend, mpp, mpp_csv, overwrite,
                       cluster) -> None:
    """Segment tissue, tile every magnification of the cascade and embed every patch.

    SLIDES are slide files, URLs (https://, s3://), folders (searched recursively) or CSVs with a
    slide_path column (files or URLs).
    Writes OUT/features/<slide_id>.h5 (with the pipeline contract), OUT/masks/<slide_id>.png,
    OUT/geojson/<slide_id>.geojson, OUT/status/<slide_id>.json and OUT/status.csv. Finished slides
    are skipped; a failing slide is recorded and the run goes on; the exit status is 1 when any
    slide failed, 2 for bad options or inputs (then nothing is written). Runs sharing OUT never
    process a slide twice (per-slide locks in OUT/locks).
    """
    from zoompipe.preprocess import PreprocessConfig, preprocess_slides

    overrides = {"mask_mpp": mask_mpp} if mask_mpp else {}
    config = PreprocessConfig(
        magnifications=magnifications, patch_size=patch_size, min_tissue=min_tissue, children=children,
        tissue=get_params(tissue_preset, **overrides), encoder=encoder, weights=weights, device=device,
        precision=precision, runtime=runtime, batch_size=batch_size, workers=workers, backend=backend, mpp=mpp,
        mpp_csv=mpp_csv, mask_dir=mask_dir)
    results = preprocess_slides(slides, out_dir, config, overwrite=overwrite, cluster=cluster)
    for row in results:
        detail = row.error if row.status == "failed" else row.detail
        click.echo(f"{row.status:8s} {row.slide_id}  {detail}", err=row.status == "failed")
    failed = sum(r.status == "failed" for r in results)
    click.echo(f"{len(results) - failed} of {len(results)} slides done, {failed} failed; see {out_dir}/status.csv")
    if failed:
        raise SystemExit(1)
