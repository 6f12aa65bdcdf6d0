"""The agent side: the swarm client and its hop sessions, routing, peer health, failover, spot
checks and the disputes it publishes, and text generation.

Imports net/ and ledger/; never serve/ or the engine (it needs no torch).
"""

from node.client.swarm import GenerationResult, SwarmClient

__all__ = ["GenerationResult", "SwarmClient"]
