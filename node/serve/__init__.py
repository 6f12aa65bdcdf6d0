"""The serving node: the daemon that owns its nursery, the session handlers, the scheduler
(batching, KV-cache admission), per-peer limits, hardware and throughput, placement, and the
announcer of its record.

Imports net/, ledger/ and the engine interface (node/engine); never the client.
"""
