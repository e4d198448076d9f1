"""Atomic writes: a file or a directory is written beside its target, then renamed over it.

An interrupted write never leaves a half-written file or directory where a good one was.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scforge_scvi._errors import ScForgeFileExistsError, ScForgePermissionError
from scforge_scvi._logging import logger


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; rename it over ``path`` on success.

    The parent directory is created; the file keeps the permissions of the one it replaces
    (``0o644`` for a new file). On any error the temporary file is removed and ``path`` is
    left as it was.

    Examples
    --------
    >>> with atomic_file("vocab.json") as tmp:
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _previous(path: Path) -> Path:
    """Where :func:`atomic_directory` keeps the previous directory while swapping."""
    return path.with_name(f".{path.name}.old")


def resolve_directory(path: str | os.PathLike) -> Path:
    """``path``, or the previous complete directory when a save was killed mid-swap.

    :func:`atomic_directory` moves the previous directory aside to ``.NAME.old`` just before
    the new one takes its place; a process killed between the two renames leaves only the
    previous one, which is then read (and put back by the next save).
    """
    path = Path(path)
    previous = _previous(path)
    if not path.exists() and previous.is_dir():
        logger.warning(f"{path} was being replaced when its writer stopped; reading {previous}.")
        return previous
    return path


def check_writable(directory: str | os.PathLike, what: str = "the output") -> None:
    """Raise a clear error unless files can be created in ``directory`` (which may not exist
    yet: its nearest existing ancestor is checked). Nothing is created.

    Raises
    ------
    ScForgePermissionError
        If that directory is read-only for this process.
    ScForgeFileExistsError
        If a file stands where a directory is needed.
    """
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ScForgeFileExistsError(
            f"'{existing}' is a file, so {what} cannot be written under it; choose a directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ScForgePermissionError(
            f"Cannot write {what} to '{directory}': '{existing}' is read-only for this user; "
            "choose a writable directory."
        )


@contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary sibling to fill, then swap it in.

    A crash or kill before the swap leaves any previous directory at ``path`` untouched (and
    a hidden ``.NAME.*`` temporary that nothing reads); one during the swap leaves the
    previous directory at ``.NAME.old``, where :func:`resolve_directory` finds it.

    Raises
    ------
    ScForgeFileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ScForgePermissionError
        If the parent directory cannot be written.
    """
    path = Path(path)
    previous = _previous(path)
    if path.exists() and not overwrite:
        raise ScForgeFileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    if path.exists() and not path.is_dir():
        raise ScForgeFileExistsError(
            f"{path} exists and is a file, not a model directory; choose another path."
        )
    check_writable(path.parent, f"'{path.name}'")
    if not path.exists() and previous.is_dir():  # a swap was interrupted: restore it first
        os.replace(previous, path)
        if not overwrite:
            raise ScForgeFileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except PermissionError as err:
        raise ScForgePermissionError(
            f"Cannot write '{path.name}' to '{path.parent}' ({err.strerror or err}); choose a "
            "writable directory."
        ) from None
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
            os.replace(tmp, path)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
