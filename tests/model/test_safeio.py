"""model/safeio.py: `atomic_write` leaves the whole new file or the old one, never a temporary
file, and `replace_directory` swaps a whole directory in, leaving nothing of the old one."""
import pytest

from model.safeio import atomic_write, atomic_write_text, replace_directory


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "state.bin"
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new"
    atomic_write_text(target, "newer")
    assert target.read_text() == "newer"

    def failing(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "newer"  # the old file stays whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.bin"]  # no temporary left


def test_replace_directory_swaps_the_whole_directory(tmp_path):
    target, staged = tmp_path / "ckpt", tmp_path / ".tmp-ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    replace_directory(staged, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"]  # nothing of the old directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or .old- folder left
    fresh = tmp_path / ".tmp-fresh"
    fresh.mkdir()
    replace_directory(fresh, tmp_path / "fresh")  # no directory to replace: a plain rename
    assert (tmp_path / "fresh").is_dir() and not fresh.exists()
