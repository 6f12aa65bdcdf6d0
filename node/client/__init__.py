"""The agent side: the swarm client and its hop sessions, routing, peer health, failover, spot
checks and the disputes it publishes, and text generation. Everything it raises is a
``ClientError`` (node/client/errors.py).

Imports net/ and ledger/; never serve/ or the engine (it needs no torch).
"""

from node.client.errors import ClientError, InvalidRequest, LayersLost, NoRoute, PeerError, PeerUnreachable
from node.client.swarm import GenerationResult, SwarmClient

__all__ = ["ClientError", "GenerationResult", "InvalidRequest", "LayersLost", "NoRoute", "PeerError",
           "PeerUnreachable", "SwarmClient"]
