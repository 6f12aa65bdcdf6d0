"""Benchmarks across simulated wide-area links (issue 16): nodes and a client in network namespaces,
joined by the delaying forwarder of node/devtools/latency.py. Root only. ``python -m benchmarks.wan``."""
