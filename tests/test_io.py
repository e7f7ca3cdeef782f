"""Atomic writes: the target appears whole or not at all."""

import json

import pytest

from apr.io import atomic_open, atomic_write_json, atomic_write_text


def test_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w") as f:
            f.write("new, half-written")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_open("x", "a"):
            pass


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask_like_open(tmp_path, umask):
    import os
    import stat

    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "atomic.txt", "x")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode)
    assert mode == 0o666 & ~umask  # e.g. 0o644 under umask 022, not mkstemp's 0o600
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
