"""Errors raised for bad input: one sentence naming what is wrong and what would be valid.

Every class derives from :class:`ValueError` or :class:`TypeError` (so ``except ValueError``
keeps working), and from :class:`ScForgeError`, which marks an error as a problem with the
caller's input rather than a bug. The file and key variants also derive from the built-in
class a caller may already catch (:class:`FileNotFoundError`, :class:`KeyError`, ...).
The command line turns any of them into a one-line message and exit code 2.
"""

from __future__ import annotations


class ScForgeError(Exception):
    """Base of the errors raised for bad input."""

    def __str__(self) -> str:  # the message alone, as KeyError and OSError would not print it
        return str(self.args[0]) if self.args else ""


class ScForgeValueError(ScForgeError, ValueError):
    """A value, file or setting that cannot be used."""


class ScForgeTypeError(ScForgeError, TypeError):
    """An argument or stored value of the wrong type."""


class ScForgeKeyError(ScForgeValueError, KeyError):
    """A key (layer, column, config key) that is not there."""


class ScForgeFileNotFoundError(ScForgeValueError, FileNotFoundError):
    """A file or directory that does not exist (or is not what was expected)."""


class ScForgeFileExistsError(ScForgeValueError, FileExistsError):
    """An output that exists and may not be replaced."""


class ScForgePermissionError(ScForgeValueError, PermissionError):
    """An output location that cannot be written."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (the type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__
