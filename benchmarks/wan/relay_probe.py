"""Does py-libp2p 0.8.1's circuit relay v2 carry a stream to a node behind a NAT? (issue 16)

    sudo .venv/bin/python -m benchmarks.wan.relay_probe [--delay-ms 5]

Builds three namespaces (node/devtools/netns.py): ``pub`` runs a relay (CircuitV2Protocol with
hop allowed), ``home`` sits behind a masquerading NAT (no inbound) and reserves a slot on the
relay, ``far`` dials ``<relay>/p2p-circuit/p2p/<home>`` with CircuitV2Transport and round-trips an
echo stream. Prints the dial time and the echo round trip. This probes the library alone; the
node's use of it is node/net/relay.py (``--relay-service``, ``--relay``). Found (0.8.1): the reservation must be made
explicitly (open a hop stream to the relay, ``CircuitV2Transport.reserve(stream, relay_id,
nursery)``; RelayDiscovery's auto_reserve made none within 8 s and the dialer got status 204
NO_RESERVATION); both ends need the hop and stop stream handlers set by hand
(``protocol._handle_hop_stream`` / ``_handle_stop_stream``) and the protocol run as a service.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

PORTS = {"relay": 8000, "listener": 8001, "dialer": 8002}
ECHO = "/shiza/relay-probe-echo/1.0.0"


async def _role(role: str, relay_addr: str | None, target: str | None) -> None:
    import multiaddr
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, STOP_PROTOCOL_ID, CircuitV2Protocol
    from libp2p.relay.circuit_v2.resources import RelayLimits
    from libp2p.relay.circuit_v2.transport import CircuitV2Transport
    from libp2p.tools.anyio_service import background_trio_service

    host = new_host(key_pair=create_new_key_pair(bytes([PORTS[role] % 256]) * 32))
    limits = RelayLimits(duration=600, data=1 << 30, max_circuit_conns=8, max_reservations=8)
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if role == "relay" else RelayRole.STOP)
    proto = CircuitV2Protocol(host, limits=limits, allow_hop=role == "relay")
    listen = multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/{PORTS[role]}")  # inside a namespace of ours
    async with host.run(listen_addrs=[listen]), trio.open_nursery() as nursery:
        host.set_stream_handler(PROTOCOL_ID, proto._handle_hop_stream)
        host.set_stream_handler(STOP_PROTOCOL_ID, proto._handle_stop_stream)

        async def echo(stream) -> None:  # noqa: ANN001
            await stream.write(await stream.read(1024))
            await stream.close()

        host.set_stream_handler(TProtocol(ECHO), echo)
        async with background_trio_service(proto):
            transport = CircuitV2Transport(host, proto, RelayConfig(roles=roles, limits=limits))
            print("id", host.get_id().to_base58(), flush=True)
            if role == "relay":
                await trio.sleep(300)
                return
            assert relay_addr is not None
            relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
            with trio.fail_after(30):
                await host.connect(relay)
            if role == "listener":
                with trio.fail_after(30):
                    stream = await host.new_stream(relay.peer_id, [PROTOCOL_ID])
                    print("reserved", await transport.reserve(stream, relay.peer_id, nursery), flush=True)
                await trio.sleep(300)
                return
            assert target is not None
            t0 = time.perf_counter()
            with trio.fail_after(30):
                await transport.dial(multiaddr.Multiaddr(f"{relay_addr}/p2p-circuit/p2p/{target}"))
            dial_s = time.perf_counter() - t0
            rtts = []
            for _ in range(5):
                with trio.fail_after(30):
                    t0 = time.perf_counter()
                    stream = await host.new_stream(ID.from_base58(target), [TProtocol(ECHO)])
                    await stream.write(b"through the relay")
                    got = await stream.read(1024)
                    rtts.append(time.perf_counter() - t0)
                assert got == b"through the relay", got
            print(f"dial {dial_s * 1000:.0f} ms; stream open + echo {', '.join(f'{r * 1000:.0f}' for r in rtts)} ms",
                  flush=True)
            nursery.cancel_scope.cancel()


def _wait_for(path: Path, pattern: str, timeout_s: float) -> re.Match[str]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m:
            return m
        time.sleep(0.3)
    raise SystemExit(f"no {pattern!r} in {path} after {timeout_s:.0f} s:\n{path.read_text()[-3000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan.relay_probe")
    p.add_argument("--delay-ms", type=float, default=5.0)
    p.add_argument("--role", choices=sorted(PORTS), help=argparse.SUPPRESS)
    p.add_argument("--relay-addr", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        import trio

        trio.run(_role, args.role, args.relay_addr, args.target)
        return 0
    import tempfile

    from node.devtools.netns import Network, why_unavailable

    if (reason := why_unavailable()) is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    me = [sys.executable, "-u", "-m", "benchmarks.wan.relay_probe"]
    with tempfile.TemporaryDirectory(prefix="shiza-relay-") as tmp, \
            Network(["pub", "home", "far"], delay_ms=args.delay_ms, nat="home") as net:
        out = Path(tmp)
        with open(out / "relay.log", "w") as log:
            net.popen("pub", [*me, "--role", "relay"], stdout=log, stderr=subprocess.STDOUT)
        relay_id = _wait_for(out / "relay.log", r"id (\w+)", 60)[1]
        relay_addr = f"/ip4/{net.ip('pub')}/tcp/{PORTS['relay']}/p2p/{relay_id}"
        with open(out / "listener.log", "w") as log:
            net.popen("home", [*me, "--role", "listener", "--relay-addr", relay_addr], stdout=log,
                      stderr=subprocess.STDOUT)
        home = _wait_for(out / "listener.log", r"id (\w+)", 60)[1]
        print(_wait_for(out / "listener.log", r"reserved \w+", 60)[0])
        done = net.run("far", [*me, "--role", "dialer", "--relay-addr", relay_addr, "--target", home],
                       check=False, timeout=120)
        print(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-3000:])
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
