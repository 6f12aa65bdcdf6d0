"""shiza-node: the daemon and the client of the shiza compute network."""

__version__ = "0.1.0"
