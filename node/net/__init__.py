"""The network: a libp2p host (Noise only, yamux), the DHT and what its values mean, the direct
activation channel, admission to private swarms, and framed messages on streams.

streams.py is the seam: the ``FramedStream`` interface that libp2p streams (host.py), direct
channels (direct.py) and in-memory streams (memory.py) implement, and the ``Connector`` a
client opens streams with. memory.py runs a whole network (handlers, streams, a DHT) in one
process, for tests that need no node processes.

Imports protocol/ and py-libp2p; never the engine, the serving node or the client.
"""
