"""Several hosts on one machine: Linux network namespaces joined through a delaying forwarder.

    with Network(["h1", "h2", "h3"], delay_ms=25.0) as net:
        net.ip("h1")                      # "10.77.0.1"
        net.run("h1", ["ip", "addr"])     # a command inside h1's namespace
        proc = net.popen("h2", [...])     # a process inside h2 (stopped by pid on exit)

Each host is a namespace ``shz-<tag>-<name>`` with one interface ``eth0`` (10.77.0.<i>/24), where
the tag is this process's pid and a letter per Network it opened (so two networks of one process
never share a name). Its veth pair's outer end (``shz<tag>-<i>``) stays in the root namespace with no address and IPv6
off, so the root namespace neither routes nor answers on it; the only thing that moves frames
between the outer ends is the forwarder of node/devtools/latency.py, which holds each frame for
its link's one-way delay (0 is allowed: then it is a plain userspace switch). Offloads are off on
both ends of every veth (through the ethtool ioctl, no binary needed), so frames stay MTU-sized.
No namespace has a route out of 10.77.0.0/16: nothing reaches any other network.

``nat="h3"`` puts h3 behind a router namespace ``shz-<tag>-nat``: the router sits on the shared
segment at 10.77.0.254, h3 at 10.77.1.2 behind it with its default route through the router,
which masquerades h3's outbound connections (nftables; ``apt-get install -y nftables``) and
forwards nothing inbound that h3 did not start. Delays to and from h3 are those of the router.

Root only. Everything made is removed on exit (the ``with`` block, Ctrl-C, an exception, or the
interpreter's exit); ``cleanup(prefix)`` removes what a killed run left behind, touching only
names under that run's prefix (``python -m node.devtools.netns cleanup --pid PID``).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import fcntl
import json
import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node.devtools.localswarm import NodeProcess

SUBNET = "10.77.0"  # the shared segment
NAT_SUBNET = "10.77.1"  # behind the router
ROUTER_IP = f"{SUBNET}.254"
MAX_HOSTS = 99  # interface names: "shz" + pid + letter + "-" + index + "i" <= 15 characters
CMD_TIMEOUT_S = 30.0
FORWARDER_READY_S = 20.0
STOP_GRACE_S = 20.0


_instances = itertools.count()


class NetnsError(RuntimeError):
    pass


def why_unavailable() -> str | None:
    """None where this machine can build networks; otherwise the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"shz-{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if done.returncode != 0:
        return f"`ip netns add` fails here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=CMD_TIMEOUT_S)
    return None


def nat_unavailable() -> str | None:
    if shutil.which("nft") is None:
        return "the NAT router needs nftables: apt-get install -y nftables"
    return None


# -- offloads through the ethtool ioctl ---------------------------------------------------

_SIOCETHTOOL = 0x8946
# (get, set) command numbers of the legacy ethtool_value ioctls (linux/ethtool.h).
_OFFLOADS = {"rx": (0x14, 0x15), "tx": (0x16, 0x17), "sg": (0x18, 0x19), "tso": (0x1E, 0x1F),
             "gso": (0x23, 0x24), "gro": (0x2B, 0x2C)}


def _ethtool_value(ifname: str, cmd: int, data: int = 0) -> int:
    buf = ctypes.create_string_buffer(struct.pack("II", cmd, data))
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifreq)
    return struct.unpack("II", buf.raw[:8])[1]


def offloads(ifname: str) -> dict[str, bool]:
    """The offload flags of an interface of this process's namespace."""
    return {name: bool(_ethtool_value(ifname, get)) for name, (get, _) in _OFFLOADS.items()}


def disable_offloads(ifname: str) -> None:
    """``ethtool -K IF gro off gso off tso off sg off tx off rx off``, without ethtool."""
    for name in ("gro", "gso", "tso", "sg", "tx", "rx"):
        try:
            _ethtool_value(ifname, _OFFLOADS[name][1], 0)
        except OSError as exc:
            raise NetnsError(f"cannot turn {name} offload off on {ifname}: {exc} "
                             f"(or run `apt-get install -y ethtool && ethtool -K {ifname} {name} off`)") from None
    left = [k for k, v in offloads(ifname).items() if v]
    if left:
        raise NetnsError(f"offloads still on for {ifname}: {left}")


# -- the network ------------------------------------------------------------------------

def _sh(args: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _write_sysctl(path: str, value: str) -> None:
    if Path(path).exists():  # IPv6 settings are absent where the kernel has no IPv6
        Path(path).write_text(value)


@dataclass
class Link:
    """One-way delay (and optional loss, rate) between two hosts, both directions."""

    a: str
    b: str
    delay_ms: float
    loss: float = 0.0
    rate_mbit: float | None = None


@dataclass
class Network:
    hosts: Sequence[str]
    delay_ms: float = 0.0  # every pair not named in links
    links: Sequence[Link] = ()
    loss: float = 0.0
    rate_mbit: float | None = None
    nat: str | None = None  # a host that sits behind a masquerading router
    log_dir: Path | None = None
    max_seconds: float = 3600.0  # the forwarder exits on its own after this
    pid: int = field(default_factory=os.getpid)
    tag: str = field(default="", init=False)
    _made: bool = field(default=False, init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _forwarder: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _index: dict[str, int] = field(default_factory=dict, init=False)
    _ports: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        names = list(self.hosts)
        if not 1 <= len(names) <= MAX_HOSTS or len(set(names)) != len(names):
            raise ValueError(f"need 1..{MAX_HOSTS} distinct host names, got {names}")
        for n in names:
            if not n.isalnum() or len(n) > 12:
                raise ValueError(f"host names are letters and digits, at most 12: {n!r}")
        if self.nat is not None and self.nat not in names:
            raise ValueError(f"nat host {self.nat!r} is not one of {names}")
        self._index = {n: i for i, n in enumerate(names, start=1)}
        self.tag = f"{self.pid}{chr(ord('a') + next(_instances) % 26)}"

    # names
    @property
    def prefix(self) -> str:
        return f"shz-{self.tag}-"

    @property
    def if_prefix(self) -> str:
        return f"shz{self.tag}-"

    def ns(self, host: str) -> str:
        self._check(host)
        return f"{self.prefix}{host}"

    def ip(self, host: str) -> str:
        """The address other hosts reach ``host`` at (for the NATed host: its private one, which
        only the router can reach)."""
        self._check(host)
        if host == self.nat:
            return f"{NAT_SUBNET}.2"
        return f"{SUBNET}.{self._index[host]}"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}nat"

    def _check(self, host: str) -> None:
        if host not in self._index:
            raise KeyError(f"no host {host!r} in this network ({list(self._index)})")

    # building
    def __enter__(self) -> Network:
        reason = why_unavailable()
        if reason is not None:
            raise NetnsError(reason)
        if self.nat is not None and (reason := nat_unavailable()) is not None:
            raise NetnsError(reason)
        atexit.register(self.close)
        self._made = True
        try:
            ports: dict[str, str] = {}
            for host, i in self._index.items():
                if host == self.nat:
                    continue
                ports[host] = self._add_host(self.ns(host), i, f"{SUBNET}.{i}")
            if self.nat is not None:
                ports[self.nat] = self._add_router()
            self._start_forwarder(ports)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _sh(["ip", "netns", "add", ns])
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.run_ns(ns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                                    "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"],
                    check=False)  # quiet links (no router solicitations); absent without IPv6

    def _add_host(self, ns: str, i: int | str, addr: str) -> str:
        """A namespace with eth0 at ``addr``/24 on the shared segment; returns the outer end."""
        self._add_ns(ns)
        outer, inner = f"{self.if_prefix}{i}", f"{self.if_prefix}{i}i"
        _sh(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{outer}/disable_ipv6", "1")
        disable_offloads(outer)
        disable_offloads(inner)  # before the move: the flags travel with the device
        _sh(["ip", "link", "set", inner, "netns", ns])
        _sh(["ip", "-n", ns, "link", "set", inner, "name", "eth0"])
        _sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
        _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _sh(["ip", "link", "set", outer, "up"])
        return outer

    def _add_router(self) -> str:
        assert self.nat is not None
        router, inside = self.router_ns, self.ns(self.nat)
        outer = self._add_host(router, "r", ROUTER_IP)
        self._add_ns(inside)
        a, b = f"{self.if_prefix}ra", f"{self.if_prefix}rb"
        _sh(["ip", "link", "add", a, "type", "veth", "peer", "name", b])
        _sh(["ip", "link", "set", a, "netns", router])
        _sh(["ip", "link", "set", b, "netns", inside])
        _sh(["ip", "-n", router, "link", "set", a, "name", "lan0"])
        _sh(["ip", "-n", inside, "link", "set", b, "name", "eth0"])
        _sh(["ip", "-n", router, "addr", "add", f"{NAT_SUBNET}.1/24", "dev", "lan0"])
        _sh(["ip", "-n", inside, "addr", "add", f"{NAT_SUBNET}.2/24", "dev", "eth0"])
        _sh(["ip", "-n", router, "link", "set", "lan0", "up"])
        _sh(["ip", "-n", inside, "link", "set", "eth0", "up"])
        _sh(["ip", "-n", inside, "route", "add", "default", "via", f"{NAT_SUBNET}.1"])
        self.run_ns(router, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])
        rules = (
            "table ip shz_nat {\n"
            "  chain shz_post { type nat hook postrouting priority srcnat; policy accept;\n"
            f"    oifname \"eth0\" ip saddr {NAT_SUBNET}.0/24 masquerade; }}\n"
            "  chain shz_fwd { type filter hook forward priority filter; policy drop;\n"
            "    ct state established,related accept;\n"
            "    iifname \"lan0\" oifname \"eth0\" accept; }\n"
            "}\n"
        )
        done = subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules,
                              capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if done.returncode != 0:
            raise NetnsError(f"nft in the router failed: {done.stderr.strip()}")
        return outer

    def reconfigure(self, *, delay_ms: float | None = None, links: Sequence[Link] | None = None,
                    loss: float | None = None, rate_mbit: float | None = None) -> None:
        """New delays (loss, rate) from now on: the forwarder is restarted with them. Frames in
        flight at that moment are lost (TCP sends them again)."""
        if delay_ms is not None:
            self.delay_ms = delay_ms
        if links is not None:
            self.links = links
        if loss is not None:
            self.loss = loss
        if rate_mbit is not None:
            self.rate_mbit = rate_mbit
        self._stop_forwarder()
        self._start_forwarder(self._ports)

    def _stop_forwarder(self) -> None:
        fwd, self._forwarder = self._forwarder, None
        if fwd is not None and fwd.poll() is None:
            fwd.send_signal(signal.SIGTERM)
            try:
                fwd.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                fwd.kill()
                fwd.wait(10)

    def _start_forwarder(self, ports: Mapping[str, str]) -> None:
        self._ports = dict(ports)
        cmd = [sys.executable, "-m", "node.devtools.latency", "--delay-ms", str(self.delay_ms),
               "--loss", str(self.loss), "--max-seconds", str(self.max_seconds), "--parent", str(os.getpid())]
        if self.rate_mbit is not None:
            cmd += ["--rate-mbit", str(self.rate_mbit)]
        for name, ifname in ports.items():
            cmd += ["--port", f"{name}={ifname}"]
        for link in self.links:
            self._check(link.a)
            self._check(link.b)
            spec = f"{link.a},{link.b}={link.delay_ms}"
            if link.loss or link.rate_mbit is not None:
                spec += f",{link.loss},{link.rate_mbit or 0}"
            cmd += ["--link", spec]
        stderr = open(self.log_dir / "forwarder.log", "a") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._forwarder = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env)
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        assert self._forwarder.stdout is not None
        os.set_blocking(self._forwarder.stdout.fileno(), False)
        deadline = time.monotonic() + FORWARDER_READY_S
        seen = b""
        while time.monotonic() < deadline:
            if self._forwarder.poll() is not None:
                raise NetnsError(f"the forwarder exited with {self._forwarder.returncode}")
            try:
                seen += os.read(self._forwarder.stdout.fileno(), 4096)
            except BlockingIOError:
                pass
            if b"ready" in seen:
                return
            time.sleep(0.05)
        raise NetnsError(f"the forwarder was not ready after {FORWARDER_READY_S:.0f} s")

    # running things inside
    def run_ns(self, ns: str, cmd: Sequence[str], *, check: bool = True,
               timeout: float = CMD_TIMEOUT_S, input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and done.returncode != 0:
            raise NetnsError(f"`{' '.join(cmd)}` in {ns} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def run(self, host: str, cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside ``host`` to completion (bounded by ``timeout``)."""
        return self.run_ns(self.ns(host), cmd, **kw)  # type: ignore[arg-type]

    def popen(self, host: str, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside ``host``; ``ip netns exec`` execs it, so the pid is the command's.
        Stopped (SIGTERM, then SIGKILL) when the network closes, if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *cmd], **kw)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def python(self, host: str, code: str, *args: str, timeout: float = CMD_TIMEOUT_S) -> str:
        """Run a Python snippet inside ``host`` with this interpreter; its stdout."""
        return self.run(host, [sys.executable, "-c", code, *args], timeout=timeout).stdout

    # tearing down
    def close(self) -> None:
        """Stop what was started, remove what was made. Idempotent; never raises."""
        if not self._made:
            return
        self._made = False
        atexit.unregister(self.close)
        for proc in [*self._procs, self._forwarder]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in [*self._procs, self._forwarder]:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._procs.clear()
        self._forwarder = None
        cleanup(self.pid, self.tag)


_PRIORITY = """
def _priority():
    # measure the wire, not the wait for a busy CPU: as the forwarder does (latency.py)
    import os
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(5))
    except (OSError, AttributeError):
        try:
            os.nice(-10)
        except OSError:
            pass
_priority()
"""

_ECHO_SERVER = _PRIORITY + """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(float(sys.argv[3]))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    c.sendall(d)
"""

_ECHO_CLIENT = _PRIORITY + """
import json, socket, sys, threading, time
host, port, n, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
c = socket.create_connection((host, port), timeout=timeout)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * size
out = []
for _ in range(n):
    t0 = time.perf_counter()
    sender = threading.Thread(target=c.sendall, args=(msg,))  # reading meanwhile: no deadlock
    sender.start()
    got = 0
    while got < size:
        d = c.recv(1 << 16)
        if not d:
            raise SystemExit("echo server closed early")
        got += len(d)
    out.append(time.perf_counter() - t0)
    sender.join()
c.close()
print(json.dumps(out))
"""


def tcp_round_trips(net: Network, client: str, server: str, *, n: int = 20, size: int = 100,
                    port: int = 7777, timeout_s: float = 30.0) -> list[float]:
    """Seconds per TCP round trip of ``size`` bytes from ``client`` to an echo server in ``server``
    (one connection, Nagle off, ``n`` round trips after the handshake). Both ends run at real-time
    priority where allowed, like the forwarder, so that a busy machine disturbs the figure less."""
    srv = net.popen(server, [sys.executable, "-c", _ECHO_SERVER, net.ip(server), str(port), str(timeout_s)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert srv.stdout is not None
        import select as _select

        ready, _, _ = _select.select([srv.stdout], [], [], timeout_s)
        if not ready or b"listening" not in srv.stdout.readline():
            raise NetnsError(f"echo server in {server} did not start: {srv.stderr.read() if srv.stderr else ''}")
        out = net.python(client, _ECHO_CLIENT, net.ip(server), str(port), str(n), str(size), str(timeout_s),
                         timeout=timeout_s + n * 2)
        return [float(x) for x in json.loads(out)]
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.wait(10)


def start_node(net: Network, host: str, data_dir: Path, *, model: str, layers: tuple[int, int] | None = None,
               bootstrap: Sequence[str] = (), listen: str = "/ip4/0.0.0.0/tcp/0",
               extra_args: Sequence[str] = ()) -> NodeProcess:
    """A ``shiza node run`` process inside ``host`` (node/devtools/localswarm.py's NodeProcess:
    ``wait_ready``, ``stop``). It listens on every address of its namespace by default."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "node.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "node", "-v", "node", "run", "--model", model, "--data-dir", str(data_dir),
           "--listen", listen]
    if layers is not None:
        cmd += ["--layers", f"{layers[0]}:{layers[1]}"]
    for addr in bootstrap:
        cmd += ["--bootstrap", addr]
    cmd += list(extra_args)
    log_path = data_dir / "node.log"
    with open(log_path, "wb") as log_file:
        env = {**os.environ}
        env.setdefault("GOMP_SPINCOUNT", "20000")  # as localswarm.start_node
        proc = net.popen(host, cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return NodeProcess(data_dir, proc, log_path)


def _ours(name: str, pid: int, tag: str | None) -> bool:
    if tag is not None:
        return name.startswith(f"shz-{tag}-") or name.startswith(f"shz{tag}-")
    return re.match(rf"^shz-?{pid}[a-z]-", name) is not None


def leftovers(pid: int, tag: str | None = None) -> list[str]:
    """Namespaces and root-namespace links that the run of ``pid`` made (only those of its
    network ``tag`` if given) and that still exist."""
    found = []
    done = _sh(["ip", "-j", "netns", "list"], check=False)
    for entry in json.loads(done.stdout or "[]"):
        if _ours(entry.get("name", ""), pid, tag):
            found.append(entry["name"])
    done = _sh(["ip", "-j", "link", "show"], check=False)
    for entry in json.loads(done.stdout or "[]"):
        if _ours(entry.get("ifname", ""), pid, tag):
            found.append(entry["ifname"])
    return found


def cleanup(pid: int, tag: str | None = None) -> list[str]:
    """Remove the namespaces and links of the run of ``pid`` (of its network ``tag`` if given;
    nothing else); what was removed."""
    removed = []
    done = _sh(["ip", "-j", "netns", "list"], check=False)
    for entry in json.loads(done.stdout or "[]"):
        name = entry.get("name", "")
        if _ours(name, pid, tag):
            _sh(["ip", "netns", "del", name], check=False)
            removed.append(name)
    done = _sh(["ip", "-j", "link", "show"], check=False)
    for entry in json.loads(done.stdout or "[]"):
        name = entry.get("ifname", "")
        if _ours(name, pid, tag):
            _sh(["ip", "link", "del", name], check=False)
            removed.append(name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m node.devtools.netns", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cleanup", help="remove what a killed run left behind")
    c.add_argument("--pid", type=int, required=True, help="the pid of the run (the number in shz-<pid><letter>-...)")
    args = p.parse_args(argv)
    if args.command == "cleanup":
        if args.pid == os.getpid():
            return 2
        for name in cleanup(args.pid):
            print(f"removed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
