"""Errors raised by every engine (node/engine/base.py).

    EngineError              anything the engine refuses or cannot do
    ├── BadInput             wrong shape, dtype or hidden size; positions beyond max_length;
    │                        bad sampling parameters; a span range outside the model
    ├── SessionUnknown       no open session with that id (or a duplicate id on open)
    └── CapacityExceeded     the session's cache is full, or the engine's token budget is spent

The three leaves are also ValueErrors.

Callers (the server) map these to wire error codes; nothing else escapes an engine's step
(``run_steps`` returns them per step) except bugs.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class BadInput(EngineError, ValueError):
    """The request is malformed: fix the caller, retrying will not help."""


class SessionUnknown(EngineError, ValueError):
    """No open session has this id (never opened, already closed, or opened twice)."""


class CapacityExceeded(EngineError, ValueError):
    """No room left: the session reached its max_length or the engine its cache budget."""
