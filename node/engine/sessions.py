"""The session table every engine keeps: admission against the cache budget, and what the
server's admission and metrics read from it. No torch."""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar

from node.engine.errors import CapacityExceeded, SessionUnknown


class _Sized(Protocol):
    @property
    def batch_size(self) -> int: ...
    @property
    def max_length(self) -> int: ...
    @property
    def length(self) -> int: ...  # cache columns now, padding included


S = TypeVar("S", bound=_Sized)


class SessionTable(Generic[S]):
    """Open sessions (id -> the engine's own session record) under one lock, with the budget
    ``max_cache_tokens`` on the sum of ``batch_size * max_length`` (None: unbounded)."""

    def __init__(self, max_cache_tokens: int | None) -> None:
        self._max_cache_tokens = max_cache_tokens
        self._sessions: dict[str, S] = {}
        self._lock = threading.Lock()

    @property
    def max_cache_tokens(self) -> int | None:
        return self._max_cache_tokens

    def _add(self, session_id: str, session: S) -> None:
        """Admit ``session``: ``SessionUnknown`` for an id already open, ``CapacityExceeded``
        past the budget. Takes the lock (do not hold it)."""
        asks = session.batch_size * session.max_length
        with self._lock:
            if session_id in self._sessions:
                raise SessionUnknown(f"session {session_id!r} is already open")
            if self._max_cache_tokens is not None:
                reserved = sum(s.batch_size * s.max_length for s in self._sessions.values())
                if reserved + asks > self._max_cache_tokens:
                    raise CapacityExceeded(
                        f"cache budget: {reserved} of {self._max_cache_tokens} tokens reserved, "
                        f"session asks {asks}")
            self._sessions[session_id] = session

    def _get(self, session_id: str) -> S:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise SessionUnknown(f"no open session {session_id!r}")
        return session

    def _pop(self, session_id: str) -> S:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise SessionUnknown(f"no open session {session_id!r}")
        return session

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._sessions)

    def cache_tokens_used(self) -> int:
        """Tokens held in caches now (rows times cached length, padding included)."""
        with self._lock:
            return sum(s.batch_size * s.length for s in self._sessions.values())

    def cache_tokens_reserved(self) -> int:
        """Tokens reserved by open sessions (sum of batch_size * max_length)."""
        with self._lock:
            return sum(s.batch_size * s.max_length for s in self._sessions.values())
