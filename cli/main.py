"""The ``zoompipe`` command group.

Every command is a few lines over the library. Errors a user can cause are printed as
``error: <message>`` with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, which leaves the CPU
# to the patch reader threads between encoder batches (82% -> 90% of the encoder-alone rate on
# 2 cores, benchmarks/extract.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from zoompipe import __version__
from zoompipe.errors import ZoompipeError

from .evaluate import evaluate_command
from .info import info_command
from .predict import heatmap_command, predict_command
from .preprocess import preprocess_command
from .synth import synth_command
from .train import train_command


class ZoompipeGroup(click.Group):
    """Turns library errors into one line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ZoompipeError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=ZoompipeGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="zoompipe")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """ZoomMIL whole-slide image classification: look at low magnification, zoom where it matters."""
    ctx.obj = {"debug": debug}
    # tifffile logs every damaged page it meets; the one-line error says it once.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL if not debug else logging.WARNING)
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


for command in (info_command, synth_command, preprocess_command, train_command, evaluate_command,
                predict_command, heatmap_command):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="zoompipe")


if __name__ == "__main__":
    sys.exit(main())
