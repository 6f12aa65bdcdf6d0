"""The vLLM engine: the whole model through a managed vLLM server, behind a process boundary
(``engine`` on the node's side, ``worker`` the stdlib-only supervisor under vLLM's python)."""
