"""HTTP faces of a node or an agent, ASGI served on trio: the OpenAI-compatible gateway, the swarm
map, Prometheus metrics, and the plumbing they share (``asgi``).
"""
