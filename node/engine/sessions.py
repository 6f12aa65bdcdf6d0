"""What every engine reports about its open sessions (the server's admission and metrics)."""

from __future__ import annotations

from typing import Any


class SessionTable:
    """For an engine that keeps ``self._sessions`` (id -> a session with ``batch_size``,
    ``length`` and ``max_length``) under ``self._lock``."""

    _lock: Any  # a threading lock
    _sessions: dict[str, Any]

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
