"""``shiza model prepare``, and how the client commands get a model ready.

A light install (no torch) reads models that exist on disk: a checkpoint directory, or the
default model once converted into the cache. Converting the bundled GGUF needs the node extra;
where it is installed, the commands convert on first use as before.
"""

from __future__ import annotations

import argparse
import json
import sys

from node.client.textgen import TextModel
from node.models import DEFAULT_MODEL, ModelError, ModelNotPrepared, ModelSource, find_model


def prepare(spec: str, progress: bool = True) -> ModelSource:
    """``spec`` resolved, converting the default model first where this install can.

    Raises ``ModelError`` (``ModelNotPrepared`` on a light install), never a torch error.
    """
    try:
        return find_model(spec)
    except ModelNotPrepared:
        from node.engine.errors import EngineError
        from node.engine.registry import can_convert, resolve_model

        if not can_convert():
            raise
        try:
            return resolve_model(spec, progress=progress)
        except EngineError as e:
            raise ModelError(str(e)) from e


def load_text_model(spec: str) -> TextModel:
    """The model's content id and tokenizer, for ``shiza generate``, the gateway and the demo."""
    return TextModel.load(prepare(spec))


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    model = sub.add_parser("model", help="prepare a model").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert/cache a model and print its content id")
    prep.add_argument("model", nargs="?", default=DEFAULT_MODEL)


def run(args: argparse.Namespace) -> int:
    """``shiza model prepare [MODEL]``: convert/cache it and print its id as one JSON line."""
    try:
        src = prepare(args.model)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"model_id": src.model_id, "path": str(src.path), "num_layers": src.num_layers}))
    return 0
