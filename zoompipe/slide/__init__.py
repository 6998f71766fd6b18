"""Whole-slide image access by resolution: ``open_slide(path).read_region(x, y, w, h, mpp)``."""

from .reader import Slide, open_slide
from .resolution import load_mpp_overrides, magnification_to_mpp, mpp_to_magnification, resolve_mpp

__all__ = ["Slide", "open_slide", "load_mpp_overrides", "magnification_to_mpp", "mpp_to_magnification",
           "resolve_mpp"]
