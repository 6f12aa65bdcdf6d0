"""What a host advertises: never a wildcard, loopback only when nothing else is there."""

from __future__ import annotations

import argparse

import pytest

from node.cli.node_run import parse_announce
from node.net.addrs import advertised, interface_ips
from node.net.host import open_host

SEED = bytes(range(32))


def fake_ips(family: str) -> list[str]:
    return {"ip4": ["127.0.0.1", "10.77.0.3", "169.254.1.1", "192.0.2.7"],
            "ip6": ["::1", "fe80::1", "2001:db8::5"]}[family]


def test_wildcard_becomes_the_interface_addresses_without_loopback() -> None:
    assert advertised(["/ip4/0.0.0.0/tcp/4001"], ips=fake_ips) == ["/ip4/10.77.0.3/tcp/4001", "/ip4/192.0.2.7/tcp/4001"]
    assert advertised(["/ip6/::/tcp/4001"], ips=fake_ips) == ["/ip6/2001:db8::5/tcp/4001"]


def test_loopback_only_when_it_is_all_there_is() -> None:
    only_lo = lambda family: ["127.0.0.1"] if family == "ip4" else ["::1"]  # noqa: E731
    assert advertised(["/ip4/0.0.0.0/tcp/9"], ips=only_lo) == ["/ip4/127.0.0.1/tcp/9"]


def test_concrete_addresses_stay_and_announce_replaces_everything() -> None:
    assert advertised(["/ip4/10.0.0.1/tcp/5"], ips=fake_ips) == ["/ip4/10.0.0.1/tcp/5"]
    assert advertised(["/ip4/0.0.0.0/tcp/5"], ["/ip4/203.0.113.9/tcp/4001", "/dns4/node.example/tcp/4001"],
                      ips=fake_ips) == ["/ip4/203.0.113.9/tcp/4001", "/dns4/node.example/tcp/4001"]


def test_this_machine_has_a_loopback_address() -> None:
    assert "127.0.0.1" in interface_ips("ip4")


async def test_host_advertises_announced_addresses_to_peers() -> None:
    # get_addrs() is also what identify and the DHT hand to other peers.
    async with open_host(SEED, "/ip4/127.0.0.1/tcp/0", ["/ip4/203.0.113.9/tcp/4001"]) as host:
        assert host.addrs == [f"/ip4/203.0.113.9/tcp/4001/p2p/{host.peer_id}"]
        assert [str(a) for a in host.libp2p.get_addrs()] == host.addrs


async def test_host_on_loopback_still_advertises_it() -> None:
    async with open_host(SEED) as host:
        assert len(host.addrs) == 1 and host.addrs[0].startswith("/ip4/127.0.0.1/tcp/")


@pytest.mark.parametrize("bad", ["/ip4/0.0.0.0/tcp/4001", "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/udp/5", "nonsense"])
def test_announce_flag_refuses_addresses_nobody_can_dial(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_announce(bad)
    assert parse_announce("/ip4/203.0.113.9/tcp/4001") == "/ip4/203.0.113.9/tcp/4001"
