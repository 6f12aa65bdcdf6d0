"""Receipts on disk and per session: the durable, hash-chained SQLite ledger (``store``) and the
accounting both sides of a session keep (``accounting``).

Imports protocol/ only.
"""

from node.ledger.store import LEDGER_FILE, Ledger, LedgerCorrupt, LedgerError

__all__ = ["LEDGER_FILE", "Ledger", "LedgerCorrupt", "LedgerError"]
