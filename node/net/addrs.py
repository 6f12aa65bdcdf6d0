"""The addresses a host advertises: never a wildcard, loopback only when there is nothing else.

A host listening on ``/ip4/0.0.0.0/tcp/P`` (or ``/ip6/::/tcp/P``) is reachable on every address
of its interfaces, but ``0.0.0.0`` itself means nothing to a remote peer (dialling it reaches the
dialler's own machine). ``advertised`` replaces each wildcard listen address with one address per
interface address (IPv4 from the interfaces, IPv6 from /proc/net/if_inet6 on Linux), leaving out
loopback and link-local addresses unless they are all there is. Explicit ``announce`` addresses
(``shiza node run --announce``: port forwarding, containers, a public IP the host does not see)
replace everything. Addresses are multiaddr strings without /p2p/.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Sequence

import multiaddr

__all__ = ["addrs_factory", "advertised", "interface_ips"]

_SIOCGIFADDR = 0x8915
_WILDCARDS = {"ip4": "0.0.0.0", "ip6": "::"}


def _ipv4_of(ifname: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            out = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
        except OSError:  # no IPv4 address on this interface
            return None
    return socket.inet_ntoa(out[20:24])


def _ipv6_addresses() -> list[str]:
    try:
        lines = open("/proc/net/if_inet6").read().splitlines()  # noqa: SIM115
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if fields:
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def interface_ips(family: str = "ip4") -> list[str]:
    """This host's addresses of ``family`` ("ip4" or "ip6"), in interface order."""
    if family == "ip4":
        ips = [_ipv4_of(name) for _, name in socket.if_nameindex()]
        return [ip for ip in ips if ip is not None]
    if family == "ip6":
        return _ipv6_addresses()
    raise ValueError(f"unknown address family {family!r}")


def _usable(ips: Sequence[str]) -> list[str]:
    """Without loopback and link-local addresses, unless nothing else is left."""
    good = [ip for ip in ips if not (ipaddress.ip_address(ip).is_loopback or ipaddress.ip_address(ip).is_link_local)]
    if good:
        return good
    return [ip for ip in ips if ipaddress.ip_address(ip).is_loopback]


def advertised(listen: Sequence[str], announce: Sequence[str] = (),
               ips: Callable[[str], list[str]] = interface_ips) -> list[str]:
    """What to tell peers for a host listening on ``listen`` (see the module's docstring)."""
    if announce:
        return [str(multiaddr.Multiaddr(a)) for a in announce]
    out: list[str] = []
    for addr in listen:
        parts = addr.split("/")  # "", "ip4", "0.0.0.0", "tcp", "P", ...
        if len(parts) > 2 and _WILDCARDS.get(parts[1]) == parts[2]:
            for ip in _usable(ips(parts[1])):
                out.append("/".join(["", parts[1], ip, *parts[3:]]))
        else:
            out.append(addr)
    return list(dict.fromkeys(out))


def addrs_factory(announce: Sequence[str] = ()) -> Callable[[list[multiaddr.Multiaddr]], list[multiaddr.Multiaddr]]:
    """A py-libp2p ``addrs_factory``: what ``host.get_addrs()`` (identify, the DHT, our records)
    reports, from the transport's listen addresses."""

    def factory(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        return [multiaddr.Multiaddr(a) for a in advertised([str(c) for c in candidates], announce)]

    return factory
