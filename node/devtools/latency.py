"""A userspace latency injector: an Ethernet switch that holds every frame for its link's delay.

    python -m node.devtools.latency --port h1=shz123-1 --port h2=shz123-2 --delay-ms 25 \
        [--link h1,h2=40[,LOSS,RATE_MBIT]] [--loss 0.01] [--rate-mbit 100] [--max-seconds 3600]

It needs no kernel module (this kernel has no netem). Each ``--port NAME=IFNAME`` is an interface
of this namespace (the outer end of a veth pair whose inner end sits in a network namespace,
node/devtools/netns.py builds them). One thread reads every frame that arrives on any port with an
``AF_PACKET`` raw socket (frames this process wrote come back as PACKET_OUTGOING and are
skipped), learns which port each source MAC sits behind, and queues the frame for the destination
port (every other port for broadcasts and unknown destinations) on a heap keyed by its due time:
its arrival (the kernel's receive timestamp, SO_TIMESTAMPNS, so time spent waiting to be read is
not added) + the link's one-way delay, after the link's serialisation time at the given rate,
unless the link's loss drops it. It runs at real-time priority where allowed (``--priority``): on
a machine whose cores are busy, a frame would otherwise wait for the forwarder to be scheduled.
Due frames are written out; the wait in between is a ``select`` timeout to the next due frame
(microsecond resolution). Frames keep their order on each link.

Bounded: the queue holds at most ``--max-queue`` frames (more are dropped, like a full router
buffer), it exits after ``--max-seconds``, when its ``--parent`` pid is gone, or on SIGTERM /
SIGINT, and then prints its counters as one JSON line on stderr. It prints ``ready`` on stdout once
every port is open. Veth offloads must be off (frames larger than the MTU cannot be written back:
they are counted as ``oversize`` and dropped).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MAX_FRAME = 65536
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not name it
TIMESPEC = struct.Struct("@qq")
ANC_SIZE = socket.CMSG_SPACE(TIMESPEC.size)
MTU_FRAME = 1514 + 4  # 1500 bytes of payload, the Ethernet header, a VLAN tag
READ_BURST = 64  # frames read from one port before looking at the others
CHECK_EVERY_S = 0.2  # how often the loop looks at the clock, the parent and the signals


@dataclass
class LinkSpec:
    delay_s: float
    loss: float = 0.0
    rate_bps: float | None = None
    free_at: float = 0.0  # when the link has finished serialising what it holds


@dataclass
class Counters:
    received: int = 0
    forwarded: int = 0
    dropped_loss: int = 0
    dropped_queue: int = 0
    dropped_oversize: int = 0
    dropped_send: int = 0
    flooded: int = 0
    max_late_ms: float = 0.0


@dataclass
class Switch:
    ports: dict[str, str]  # name -> interface
    default: LinkSpec
    links: dict[tuple[str, str], LinkSpec] = field(default_factory=dict)  # directed, (src, dst)
    max_queue: int = 100_000
    seed: int | None = None

    def link(self, src: str, dst: str) -> LinkSpec:
        spec = self.links.get((src, dst))
        if spec is None:
            spec = LinkSpec(self.default.delay_s, self.default.loss, self.default.rate_bps)
            self.links[(src, dst)] = spec
        return spec

    def run(self, *, max_seconds: float, parent: int | None = None, on_ready=None) -> Counters:  # noqa: ANN001
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        socks: dict[str, socket.socket] = {}
        try:
            for name, ifname in self.ports.items():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.bind((ifname, 0))
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                socks[name] = s
            if on_ready is not None:
                on_ready()
            return self._loop(socks, max_seconds, parent, lambda: stop)
        finally:
            for s in socks.values():
                s.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _loop(self, socks: dict[str, socket.socket], max_seconds: float, parent: int | None,
              stopped) -> Counters:  # noqa: ANN001
        rng = random.Random(self.seed)
        by_fd = {s.fileno(): name for name, s in socks.items()}
        readers = list(socks.values())
        macs: dict[bytes, str] = {}
        heap: list[tuple[float, int, str, bytes]] = []
        seq = itertools.count()
        c = Counters()
        clock = time.monotonic
        end = clock() + max_seconds
        next_check = 0.0
        while True:
            now = clock()
            if now >= next_check:
                if stopped() or now >= end or (parent is not None and not _alive(parent)):
                    return c
                next_check = now + CHECK_EVERY_S
            wait = CHECK_EVERY_S if not heap else max(0.0, heap[0][0] - now)
            ready, _, _ = select.select(readers, [], [], min(wait, CHECK_EVERY_S))
            now = clock()
            wall_offset = time.time() - now  # the kernel stamps arrivals on the wall clock
            for s in ready:
                src = by_fd[s.fileno()]
                for _ in range(READ_BURST):
                    try:
                        data, anc, _flags, addr = s.recvmsg(MAX_FRAME, ANC_SIZE)
                    except (BlockingIOError, InterruptedError):
                        break
                    if addr[2] == PACKET_OUTGOING:
                        continue
                    arrived = _arrival(anc, wall_offset, now)
                    c.received += 1
                    if len(data) > MTU_FRAME:
                        c.dropped_oversize += 1
                        continue
                    macs[data[6:12]] = src
                    dst_mac = data[0:6]
                    known = None if dst_mac[0] & 1 else macs.get(dst_mac)
                    if known is None:
                        targets = [p for p in socks if p != src]
                        c.flooded += 1
                    elif known == src:
                        continue
                    else:
                        targets = [known]
                    for dst in targets:
                        spec = self.link(src, dst)
                        if spec.loss and rng.random() < spec.loss:
                            c.dropped_loss += 1
                            continue
                        if len(heap) >= self.max_queue:
                            c.dropped_queue += 1
                            continue
                        due = arrived
                        if spec.rate_bps:
                            spec.free_at = max(arrived, spec.free_at) + len(data) * 8 / spec.rate_bps
                            due = spec.free_at
                        heapq.heappush(heap, (due + spec.delay_s, next(seq), dst, data))
            now = clock()
            while heap and heap[0][0] <= now:
                due, _, dst, data = heapq.heappop(heap)
                late = (now - due) * 1000
                if late > c.max_late_ms:
                    c.max_late_ms = late
                try:
                    socks[dst].send(data)
                    c.forwarded += 1
                except OSError:  # ENOBUFS and kin: the wire is full, the frame is lost
                    c.dropped_send += 1


def _arrival(anc: list, wall_offset: float, now: float) -> float:
    """When the kernel received the frame, on the monotonic clock: a frame's delay counts from
    there, so time the forwarder spent waiting for a CPU before reading it is not added to it."""
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= TIMESPEC.size:
            sec, nsec = TIMESPEC.unpack_from(data)
            return min(now, sec + nsec * 1e-9 - wall_offset)
    return now


def raise_priority(kind: str) -> str:
    """Ask to be scheduled ahead of the processes whose traffic it carries, so that a busy machine
    delays frames less; what it got."""
    if kind == "rt":
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
            return "rt"
        except (OSError, AttributeError):
            kind = "nice"
    if kind == "nice":
        try:
            os.nice(-10)
            return "nice"
        except OSError:
            pass
    return "none"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_link(text: str) -> tuple[str, str, LinkSpec]:
    """``A,B=DELAY_MS[,LOSS[,RATE_MBIT]]`` (both directions)."""
    try:
        names, values = text.split("=", 1)
        a, b = names.split(",")
        parts = [float(v) for v in values.split(",")]
        delay_ms = parts[0]
        loss = parts[1] if len(parts) > 1 else 0.0
        rate = parts[2] if len(parts) > 2 and parts[2] > 0 else None
        if len(parts) > 3 or delay_ms < 0 or not 0 <= loss < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"a link looks like A,B=DELAY_MS[,LOSS[,RATE_MBIT]], got {text!r}") from None
    return a, b, LinkSpec(delay_ms / 1000, loss, None if rate is None else rate * 1e6)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.devtools.latency", description=__doc__.split("\n")[0])
    p.add_argument("--port", action="append", default=[], metavar="NAME=IFNAME", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay of every link not named")
    p.add_argument("--loss", type=float, default=0.0, help="probability that a frame is dropped")
    p.add_argument("--rate-mbit", type=float, default=None, help="each link's rate, each direction")
    p.add_argument("--link", action="append", default=[], type=parse_link, metavar="A,B=MS[,LOSS[,MBIT]]")
    p.add_argument("--max-queue", type=int, default=100_000)
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--parent", type=int, default=None, help="exit when this pid is gone")
    p.add_argument("--seed", type=int, default=None, help="of the loss draws")
    p.add_argument("--priority", choices=["rt", "nice", "none"], default="rt",
                   help="rt: SCHED_RR (a wire does not wait for a CPU; the kernel's RT throttling still "
                        "leaves 5%% to the rest), nice: nice -10; each falls back to the next if refused")
    args = p.parse_args(argv)
    raise_priority(args.priority)
    ports = {}
    for spec in args.port:
        name, _, ifname = spec.partition("=")
        if not name or not ifname or name in ports:
            p.error(f"--port wants distinct NAME=IFNAME, got {spec!r}")
        ports[name] = ifname
    if args.delay_ms < 0 or not 0 <= args.loss < 1:
        p.error("--delay-ms >= 0 and 0 <= --loss < 1")
    rate = None if args.rate_mbit is None else args.rate_mbit * 1e6
    switch = Switch(ports, LinkSpec(args.delay_ms / 1000, args.loss, rate), max_queue=args.max_queue,
                    seed=args.seed)
    for a, b, spec in args.link:
        if a not in ports or b not in ports:
            p.error(f"--link {a},{b}: both must be ports")
        switch.links[(a, b)] = spec
        switch.links[(b, a)] = LinkSpec(spec.delay_s, spec.loss, spec.rate_bps)
    counters = switch.run(max_seconds=args.max_seconds, parent=args.parent,
                          on_ready=lambda: print("ready", flush=True))
    print(json.dumps(counters.__dict__), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
