"""zoompipe: ZoomMIL whole-slide image classification from raw slides."""

__version__ = "0.1.0"
