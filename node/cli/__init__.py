"""The ``shiza`` command: one module per subcommand. The only importer of benchmarks/."""

from node.cli.main import main

__all__ = ["main"]
