"""A disk that fills up while the default model converts is one line and exit code 5, with no
progress bar when stderr is no terminal (issue 21). A real full disk: a small tmpfs mounted here
(root only), the real conversion of the bundled SmolLM2 through the real ``shiza`` entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.cli.errors import EXIT_STORAGE

SHIZA = str(Path(sys.executable).with_name("shiza"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root"),
]


@pytest.fixture
def small_disk(tmp_path: Path):
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=30)


def test_a_full_disk_while_converting_is_one_line_and_leaves_no_half_model(small_disk: Path) -> None:
    # Before: "error: internal error: SafetensorError: ... os error 28 (a bug: ...)", exit 1,
    # after a progress bar drawn into the pipe.
    env = {**os.environ, "SHIZA_CACHE": str(small_disk / "cache")}
    done = subprocess.run([SHIZA, "model", "prepare"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == EXIT_STORAGE, done.stderr
    assert done.stderr.startswith("error: disk full") and done.stderr.count("\n") == 1, done.stderr
    assert "converting" not in done.stderr  # no progress bar: stderr is not a terminal
    models = small_disk / "cache" / "models"
    assert not (models / "smollm2-135m").exists()  # nothing half-written is taken for a model
    assert not list(models.glob(".smollm2-135m.tmp-*"))
