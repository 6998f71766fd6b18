"""Errors that reach the user as one line.

Every error a user can cause (a bad file, a missing flag, a wrong checkpoint) is raised as a
subclass of :class:`ZoompipeError` whose message is a single line that says what is wrong and,
where there is one, the fix. The CLI prints ``error: <message>``; the exit status follows
click's convention: 2 for a :class:`UsageError` (a bad option value, refused before any work),
1 for everything else (a slide or a run that failed).
"""


class ZoompipeError(Exception):
    """Base class of the errors the CLI reports as one line."""


class UsageError(ZoompipeError):
    """An option value or input list that no run could succeed with (exit status 2)."""


class SlideError(ZoompipeError):
    """A slide cannot be opened or read, or its resolution is unknown."""


class NoTissueError(ZoompipeError):
    """Tissue segmentation found nothing to tile."""


class CheckpointError(ZoompipeError):
    """A model checkpoint or run folder is missing, unsafe, truncated or inconsistent."""


class FeatureFileError(ZoompipeError):
    """A feature file is missing, incomplete or not in a layout zoompipe reads."""


class ContractError(ZoompipeError):
    """A pipeline contract is missing, of another schema version, invalid, or disagrees with another."""


class MaskError(ZoompipeError):
    """Tissue parameters or a user-supplied mask file are invalid."""


class GridError(ZoompipeError, ValueError):
    """Magnifications or grid arguments that cannot make nested patch grids."""


def one_line(err: BaseException) -> str:
    """The message of an exception on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def describe_failure(err: BaseException, where: object) -> str:
    """The one-line reason a slide failed.

    The message of our errors, which names the slide; for any other exception, ``where`` (the
    slide), the exception's type and message and the function that raised it.
    """
    if isinstance(err, ZoompipeError):
        return one_line(err)
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    function = f" at {tb.tb_frame.f_code.co_name}" if tb is not None else ""
    return f"{where}: internal error: {type(err).__name__}: {one_line(err)}{function}"
