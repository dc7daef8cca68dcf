"""The one atomic writer: every file tmerge writes goes through :func:`atomic_paths`.

Each file is written to a temp file in its own directory, flushed to disk (fsync), given the
permissions a plain ``open(path, "w")`` would give (0666 minus the umask; ``mkstemp`` alone leaves
0600), and renamed over the target. With several files the write is all-or-nothing: all temps are
written before the first rename, and when a later rename fails the files already renamed are put
back as they were (old contents restored, new files removed), so a file and its manifest always
match.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from .errors import TmergeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], *, mkdir: bool = False) -> Iterator[list[Path]]:
    """Temp paths, one per target (same directory); the caller writes them inside the ``with``
    block; on a clean exit each is fsynced, chmodded and renamed onto its target. On an error the
    temps are removed and the targets stay as they were. ``mkdir`` creates missing parent folders."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            if mkdir:
                target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            temps.append(Path(tmp))
        yield list(temps)
        mode = 0o666 & ~_umask()
        for tmp in temps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
        _replace_all(temps, targets)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def _replace_all(temps: list[Path], targets: list[Path]) -> None:
    """Rename each temp onto its target; if one rename fails, undo the ones before it."""
    done: list[tuple[Path, Path | None]] = []  # (target, backup of its old contents or None)
    try:
        for tmp, target in zip(temps, targets):
            backup = None
            if len(targets) > 1 and target.is_file():
                backup = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
                try:
                    os.link(target, backup)
                except OSError:  # no hard links on this file system
                    shutil.copy2(target, backup)
            try:
                os.replace(tmp, target)
            except BaseException:
                if backup is not None:
                    backup.unlink()
                raise
            done.append((target, backup))
    except BaseException:
        for target, backup in reversed(done):
            with contextlib.suppress(OSError):
                if backup is None:
                    target.unlink()
                else:
                    os.replace(backup, target)
        raise
    for _, backup in done:
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def write_files(files: dict[Path, bytes]) -> None:
    """Write every ``path: data``, all or nothing (see :func:`atomic_paths`); an OSError becomes a
    one-line TmergeError naming the file that failed, and the old files stay as they were."""
    current = next(iter(files))
    try:
        with atomic_paths(list(files)) as temps:
            for tmp, (current, data) in zip(temps, files.items()):
                tmp.write_bytes(data)
    except OSError as e:
        # a failed rename names the target second; a failed write happened while writing ``current``
        failed = e.filename2 if e.filename2 is not None else current
        raise TmergeError(f"could not write {failed}: {e.strerror or e}") from e


def json_bytes(data) -> bytes:
    """``data`` as indented JSON text; a NaN or infinity is a TmergeError, never bare ``NaN`` (not JSON)."""
    try:
        return (json.dumps(data, indent=2, allow_nan=False, default=str) + "\n").encode()
    except ValueError as e:
        raise TmergeError(f"refusing to write invalid JSON: {e}") from e


def write_text(path: str | os.PathLike, text: str, *, mkdir: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; OSErrors propagate."""
    path = Path(path)
    with atomic_paths([path], mkdir=mkdir) as (tmp,):
        tmp.write_text(text)
    return path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path when it is a readable file; else a TmergeError that says what is wrong
    (missing, a directory, unreadable)."""
    path = Path(path)
    if path.is_dir():
        raise TmergeError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise TmergeError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise TmergeError(f"{what} {path} is not readable")
    return path


def writable_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """``path`` as a Path when a file can be written there: checked before any work, nothing created.

    The folder must exist (no command creates folders for a file it writes) and be writable, the
    path must not be a folder or a read-only file, and it must end in one of ``suffixes`` if given.
    """
    if not str(path).strip():
        raise TmergeError(f"{what} is empty; give a file name")
    path = Path(path).expanduser()
    if str(path) == "." or path.name in ("", ".", ".."):
        raise TmergeError(f"{what} {str(path)!r} is not a file path")
    if path.is_dir():
        raise TmergeError(f"{what} {path} is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise TmergeError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TmergeError(f"cannot write {path}: directory {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise TmergeError(f"cannot write {path}: the existing file is not writable")
    if suffixes and path.suffix.lower() not in suffixes:
        raise TmergeError(f"{what} {path} should end in {' or '.join(suffixes)}")
    return path


def check_distinct(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """A TmergeError when an output path (``{what: path}``) is one of the inputs: writing it would
    destroy what the command reads."""
    def key(path) -> Path:
        return Path(path).expanduser().resolve()

    given = {what: key(path) for what, path in inputs.items() if path is not None}
    for out_what, out in outputs.items():
        if out is None:
            continue
        for in_what, source in given.items():
            if key(out) == source:
                raise TmergeError(f"{out_what} {out} is {in_what}: it would be overwritten; write elsewhere")


def writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path when files can be written into it (it may not exist yet if its parent does)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise TmergeError(f"{what} {path} is a file, not a folder")
    base = path if path.is_dir() else path.parent
    if not base.is_dir():
        raise TmergeError(f"cannot write into {path}: directory {base} does not exist")
    if not os.access(base, os.W_OK | os.X_OK):
        raise TmergeError(f"cannot write into {path}: directory {base} is not writable")
    return path
