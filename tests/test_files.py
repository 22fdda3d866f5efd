"""The one atomic-write helper: the target holds the new content or the old one, never a part."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_playground.files import atomic_file, temporary_name, write_atomic


def test_write_atomic_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "config.toml"
    target.write_text("old", encoding="utf-8")
    write_atomic(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpt_last_00000004.pt"
    target.write_bytes(b"earlier")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(target) as handle:
        handle.write(b"half of it")
        assert temporary_name(target).exists()
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
