"""Real node processes on loopback, shared by the tests of a module."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.engine.testing import make_tiny_model
from node.devtools.localswarm import NodeProcess, start_chain, stop_all

TINY_SPANS = [(0, 2), (2, 4), (4, 6)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0, arch="llama", num_layers=6)


@pytest.fixture(scope="module")
def tiny_swarm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[NodeProcess]:
    """Three node processes serving the tiny model as spans 0:2, 2:4, 4:6."""
    nodes = start_chain(tmp_path_factory.mktemp("swarm"), TINY_SPANS, model=str(tiny_model), timeout_s=120)
    yield nodes
    stop_all(nodes)
