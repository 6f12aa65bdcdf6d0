"""The network: a libp2p host (Noise only, yamux), the DHT and what its values mean, the direct
activation channel, admission to private swarms, and framed messages on streams.

Imports protocol/ and py-libp2p; never the engine, the serving node or the client.
"""
