"""What the ledger raises (the tree is drawn in node/ledger/store.py's docstring)."""

from __future__ import annotations

__all__ = ["DuplicateEntry", "LedgerCorrupt", "LedgerError"]


class LedgerError(Exception):
    """Base of every error the ledger raises."""


class LedgerCorrupt(LedgerError):
    """The ledger file cannot be trusted; it is reported and left untouched, never repaired."""


class DuplicateEntry(LedgerError):
    """The receipt_id, the (server, client, seq) triple or the (server, client, session_id,
    checkpoint) of a session is already in the ledger."""
