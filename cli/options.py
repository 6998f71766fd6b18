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
