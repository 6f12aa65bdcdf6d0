"""Exception groups of one: what callers of the client see instead."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


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
