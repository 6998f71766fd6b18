"""Where a slide's resolution comes from: metadata first, the objective power second, else an error.

Magnification ``m`` always means ``mpp = 10 / m`` (a 40x objective images 0.25 um per pixel).
Values are used as found: no rounding to the usual 0.25 / 0.5 buckets.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping

from ..errors import SlideError, UsageError
from ..tables import read_table

MPP_FIX = "pass --mpp, or --mpp-csv with a 'slide_id,mpp' table of overrides"

# Checked in order; the first that holds a plausible value wins.
_MPP_KEYS = ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP")
_POWER_KEYS = ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag")
_UM_PER_UNIT = {"centimeter": 1e4, "inch": 25400.0}


def magnification_to_mpp(magnification: float) -> float:
    """Microns per pixel of a magnification, by the convention ``mpp = 10 / m``."""
    return 10.0 / magnification


def mpp_to_magnification(mpp: float) -> float:
    """Magnification of a resolution in microns per pixel, by the convention ``m = 10 / mpp``."""
    return 10.0 / mpp


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _plausible_mpp(value: object) -> float | None:
    number = _positive(value)
    # 0.01 um/px is beyond any optical scanner, 100 um/px is a macro photo: neither is a WSI level.
    return number if number is not None and 0.01 <= number <= 100 else None


def _mpp_from_tiff_tags(properties: Mapping[str, object]) -> float | None:
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    per_unit = _positive(properties.get("tiff.XResolution"))
    if unit not in _UM_PER_UNIT or per_unit is None:
        return None
    return _plausible_mpp(_UM_PER_UNIT[unit] / per_unit)


def objective_power(properties: Mapping[str, object]) -> float | None:
    """The nominal objective power recorded by the scanner, or None."""
    for key in _POWER_KEYS:
        power = _positive(properties.get(key))
        if power is not None:
            return power
    return None


def resolve_mpp(properties: Mapping[str, object], override: float | None = None,
                name: str = "slide") -> tuple[float, str]:
    """Level-0 microns per pixel of a slide and the source it was taken from.

    Parameters
    ----------
    properties : mapping
        The backend's slide properties.
    override : float, optional
        A user-given value; wins over everything.
    name : str
        Slide name for the error message.

    Returns
    -------
    mpp : float
    source : str
        ``"override"``, the property key it was read from, or ``"objective-power"``.

    Raises
    ------
    SlideError
        When neither resolution nor objective power is known and no override is given.
    """
    if override is not None:
        if _plausible_mpp(override) is None:
            raise SlideError(f"{name}: mpp override {override!r} is not a plausible resolution (0.01-100 um/px)")
        return float(override), "override"
    for key in _MPP_KEYS:
        mpp = _plausible_mpp(properties.get(key))
        if mpp is not None:
            return mpp, key
    mpp = _mpp_from_tiff_tags(properties)
    if mpp is not None:
        return mpp, "tiff.XResolution"
    power = objective_power(properties)
    if power is not None:
        mpp = magnification_to_mpp(power)
        warnings.warn(f"{name}: no mpp in the metadata, assuming {mpp:g} um/px from objective power "
                      f"{power:g}x; {MPP_FIX} to set it", stacklevel=2)
        return mpp, "objective-power"
    raise SlideError(f"{name}: no resolution (mpp) or objective power in the metadata; {MPP_FIX}")


def load_mpp_overrides(path: str | Path) -> dict[str, float]:
    """Read a ``slide_id,mpp`` CSV of per-slide resolution overrides.

    ``slide_id`` is the file name without its extension.
    """
    rows = read_table(path, ("slide_id", "mpp"))
    overrides = {}
    for row in rows:
        mpp = _plausible_mpp(row["mpp"])
        if mpp is None:
            raise UsageError(f"{path}: mpp {row['mpp']!r} of slide {row['slide_id']!r} is not a plausible resolution")
        overrides[row["slide_id"]] = mpp
    return overrides
