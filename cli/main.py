"""The ``zoompipe`` command group.

Every command is a few lines over the library. Errors are printed here, and only here, as one
line ``error: <message>``, with click's exit statuses: 2 for a usage error (a bad option value,
refused before any work starts), 1 for a slide or a run that failed. ``--debug`` shows the
traceback of library errors instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from zoompipe import __version__
from zoompipe.environment import apply_speed_settings
from zoompipe.errors import UsageError, ZoompipeError

from .encoders import encoders_command
from .evaluate import evaluate_command
from .info import info_command
from .predict import heatmap_command, predict_command
from .preprocess import preprocess_command
from .synth import synth_command
from .train import train_command


class _Reported(click.ClickException):
    """A library error on its way to :meth:`ZoompipeGroup.main`."""

    def __init__(self, err: ZoompipeError) -> None:
        super().__init__(str(err))
        self.exit_code = 2 if isinstance(err, UsageError) else 1


class ZoompipeGroup(click.Group):
    """Reports every error as one line with click's exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ZoompipeError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise _Reported(err) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as err:
            click.echo(f"error: {' '.join(err.format_message().split())}", err=True)
            status = err.exit_code
        except click.Abort:
            click.echo("error: aborted", err=True)
            status = 1
        sys.exit(status if isinstance(status, int) else 0)


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


for command in (info_command, synth_command, encoders_command, preprocess_command, train_command,
                evaluate_command, predict_command, heatmap_command):
    cli.add_command(command)


def main() -> None:
    """The console entry point: speed settings first (before torch loads), then the commands.

    The process ends without the interpreter's teardown: freeing torch's and OpenVINO's modules
    one by one took 0.5 s after every command that loads them (2 cores), for memory that the
    system takes back at once. Every file is written and closed by then, and no command leaves
    work behind in atexit handlers; only the standard streams need flushing.
    """
    apply_speed_settings()
    try:
        cli(prog_name="zoompipe")
    except SystemExit as end:
        status = end.code
    else:
        status = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (zoompipe info | head): nothing to keep
            pass
    os._exit(status if isinstance(status, int) else 1)


if __name__ == "__main__":
    main()
