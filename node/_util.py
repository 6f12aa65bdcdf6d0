"""Small helpers shared by node modules."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash or Ctrl-C never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _single_leaf(group: BaseExceptionGroup) -> BaseException | None:
    while isinstance(group, BaseExceptionGroup):
        if len(group.exceptions) != 1:
            return None
        group = group.exceptions[0]  # type: ignore[assignment]
    return group


@contextmanager
def unwrap_single_groups() -> Iterator[None]:
    """Re-raise the one exception inside nested single-member exception groups.

    Nurseries inside libp2p's services wrap whatever the body raised; callers of the client
    should see the NoRoute or protocol error itself, not a group of one.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if leaf is None:
            raise
        raise leaf from None
