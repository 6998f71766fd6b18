"""Errors that reach the user as one line.

Every error a user can cause (a bad file, a missing flag, a wrong checkpoint) is raised as a
subclass of :class:`ZoompipeError` whose message is a single line that says what is wrong and,
where there is one, the fix. The CLI prints ``error: <message>`` and exits with status 2.
"""


class ZoompipeError(Exception):
    """Base class of the errors the CLI reports as one line."""


class SlideError(ZoompipeError):
    """A slide cannot be opened or read, or its resolution is unknown."""


class NoTissueError(ZoompipeError):
    """Tissue segmentation found nothing to tile."""


class CheckpointError(ZoompipeError):
    """A model checkpoint or run folder is missing, unsafe, truncated or inconsistent."""


class FeatureFileError(ZoompipeError):
    """A feature file is missing, incomplete or not in a layout zoompipe reads."""


class MaskError(ZoompipeError):
    """Tissue parameters or a user-supplied mask file are invalid."""


class GridError(ZoompipeError, ValueError):
    """Magnifications or grid arguments that cannot make nested patch grids."""
