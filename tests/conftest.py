"""Shared fixtures: tiny seeded checkpoints (fast) and the real SmolLM2 (slow tests only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from node.models import ModelSource

_TESTS = Path(__file__).resolve().parent
# Folders whose tests start node processes, networks or namespaces: marked `integration`, so that
# `make test-fast` (in-process tests only) leaves them out.
_INTEGRATION = (_TESTS / "integration", _TESTS / "benchmarks")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(Path(item.path).is_relative_to(folder) for folder in _INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_source_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ModelSource]:
    """``make(arch="llama", seed=0, num_layers=6, hidden_size=64) -> ModelSource``, memoised."""
    from node.engine.registry import resolve_model
    from node.engine.testing import make_tiny_model

    made: dict[tuple[str, int, int, int], ModelSource] = {}

    def make(arch: str = "llama", seed: int = 0, num_layers: int = 6,
             hidden_size: int = 64) -> ModelSource:
        key = (arch, seed, num_layers, hidden_size)
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}-s{seed}-l{num_layers}-h{hidden_size}")
            make_tiny_model(path, seed=seed, arch=arch, num_layers=num_layers,
                            hidden_size=hidden_size)
            made[key] = resolve_model(str(path), progress=False)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_source_factory: Callable[..., ModelSource]) -> ModelSource:
    """A 6-layer, hidden-64 random Llama with tied embeddings and SmolLM2's tokenizer."""
    return tiny_source_factory("llama")


@pytest.fixture(scope="session")
def smollm2() -> ModelSource:
    """The embedded SmolLM2-135M-Instruct (converted once into the user's cache, ~30 s)."""
    from node.engine.registry import resolve_model

    return resolve_model("smollm2-135m")
