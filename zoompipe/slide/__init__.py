"""Whole-slide image access by resolution: ``open_slide(path_or_url).read_region(x, y, w, h, mpp)``."""

from .reader import Slide, open_slide
from .resolution import load_mpp_overrides, magnification_to_mpp, mpp_to_magnification, resolve_mpp
from .source import SlideSource, is_url, slide_source

__all__ = ["Slide", "SlideSource", "open_slide", "is_url", "slide_source", "load_mpp_overrides",
           "magnification_to_mpp", "mpp_to_magnification", "resolve_mpp"]
