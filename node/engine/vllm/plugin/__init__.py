"""What the vLLM server loads from the node (this directory goes on its ``PYTHONPATH``): code
that runs under vLLM's python and imports nothing of ``node``."""
