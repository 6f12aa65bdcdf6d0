"""A few real libp2p hosts on loopback, each running the swarm's DHT, in one trio run."""

from __future__ import annotations

from contextlib import AsyncExitStack

from node.net.dht import SwarmDHT, open_dht
from node.net.host import Host, open_host
from node.net.records import DHT_SELECTORS, DHT_VALIDATORS
from protocol.identity import Identity


async def dht_swarm(stack: AsyncExitStack, n: int) -> tuple[list[Identity], list[Host], list[SwarmDHT]]:
    """``n`` hosts with fresh identities, each DHT bootstrapped from the first; closed with ``stack``."""
    ids = [Identity.generate() for _ in range(n)]
    hosts: list[Host] = []
    dhts: list[SwarmDHT] = []
    for ident in ids:
        host = await stack.enter_async_context(open_host(ident.seed))
        boot = [hosts[0].addrs[0]] if hosts else []
        dht = await stack.enter_async_context(open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, boot))
        hosts.append(host)
        dhts.append(dht)
    return ids, hosts, dhts
