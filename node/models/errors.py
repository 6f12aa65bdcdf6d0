"""Errors about models: what a spec names, what a checkpoint holds, what a tokenizer can do.

    ModelError           the spec, checkpoint or tokenizer cannot be used as given
    └── ModelNotPrepared the default model has not been converted into the cache yet

Each message says what to do next; a command prints it as one line.
"""

from __future__ import annotations


class ModelError(Exception):
    """A model spec, checkpoint directory or tokenizer that cannot be used as given."""


class ModelNotPrepared(ModelError):
    """The default model is not in the cache: ``shiza model prepare`` converts it (needs torch)."""
