"""The node's side of engine supervision: the engine reports health, the node drains,
restarts, announces itself online again, and gives up after too many restarts."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import SimpleNamespace

import pytest
import trio

from node.engine.base import EngineHealth
from node.engine.errors import EngineError
from node.serve.daemon import supervise_engine


class Reporting:
    """A supervised engine that reports a fixed story, one report per watch step."""

    def __init__(self, reports: list[EngineHealth], reserved: int = 0) -> None:
        self.reports = reports
        self.reserved = reserved
        self.restarts = 0
        self.closed_watch = False

    def cache_tokens_reserved(self) -> int:
        return self.reserved

    def restart(self) -> None:
        self.restarts += 1

    async def watch(self) -> AsyncGenerator[EngineHealth, None]:
        try:
            for r in self.reports:
                await trio.sleep(0)
                yield r
        finally:
            self.closed_watch = True


class Node:
    """What supervise_engine acts on: the server's gate, the record state, the publisher."""

    def __init__(self) -> None:
        self.server = SimpleNamespace(accepting=True)
        self.state = SimpleNamespace(state="online", cache_tokens_left=1000)
        self.published: list[tuple[str, bool]] = []  # (record state, server accepting) per publish

    async def publish(self) -> None:
        self.published.append((self.state.state, self.server.accepting))


async def test_healthy_reports_feed_the_records_cache_room() -> None:
    node, engine = Node(), Reporting([EngineHealth(True, 0.25), EngineHealth(True, None)], reserved=100)
    await supervise_engine(engine, node.server, node.state, node.publish)  # type: ignore[arg-type]
    # Budget 1000: the last report has no usage figure, so the reservations decide: 900.
    assert node.state.cache_tokens_left == 900 and node.published == [] and engine.restarts == 0
    assert engine.closed_watch


async def test_usage_bounds_the_cache_room() -> None:
    node, engine = Node(), Reporting([EngineHealth(True, 0.75)], reserved=100)
    await supervise_engine(engine, node.server, node.state, node.publish)  # type: ignore[arg-type]
    assert node.state.cache_tokens_left == 250  # 1000 * (1 - 0.75), below 1000 - 100


async def test_down_drains_restarts_and_comes_back_online() -> None:
    node = Node()
    engine = Reporting([EngineHealth(True, 0.0), EngineHealth(False, detail="server exited"),
                        EngineHealth(True, 0.0)])
    await supervise_engine(engine, node.server, node.state, node.publish)  # type: ignore[arg-type]
    assert engine.restarts == 1
    assert node.published == [("draining", False), ("online", True)]
    assert node.server.accepting and node.state.state == "online"


async def test_gives_up_after_max_restarts_and_leaves_the_node_draining() -> None:
    node = Node()
    engine = Reporting([EngineHealth(False, detail="boom")] * 3)
    with pytest.raises(EngineError, match="giving up"):
        await supervise_engine(engine, node.server, node.state, node.publish,  # type: ignore[arg-type]
                               max_restarts=2)
    assert engine.restarts == 2
    assert node.published[-1] == ("draining", False) and not node.server.accepting
    assert engine.closed_watch  # the report stream is closed on the way out
