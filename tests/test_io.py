"""The one atomic writer: all or nothing, fsynced, and the permissions a plain open() gives."""

from __future__ import annotations

import os
import stat

from tmerge._io import atomic_paths, write_files, write_text
from tmerge.errors import TmergeError

import pytest


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_mode_honours_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_text(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.read_text() == "{}\n"


def test_several_files_all_or_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_paths([tmp_path / "keep.txt", tmp_path / "new.txt"]) as (a, b):
            a.write_text("new")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "old"
    write_files({tmp_path / "keep.txt": b"1", tmp_path / "new.txt": b"2"})
    assert (tmp_path / "keep.txt").read_bytes() == b"1" and (tmp_path / "new.txt").read_bytes() == b"2"


def test_unwritable_folder_is_one_line_error(tmp_path):
    with pytest.raises(TmergeError, match="could not write"):
        write_files({tmp_path / "missing" / "a.bin": b"x"})
    write_text(tmp_path / "made" / "a.txt", "x", mkdir=True)
    assert (tmp_path / "made" / "a.txt").read_text() == "x"
