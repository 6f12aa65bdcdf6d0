"""Fuzz a live node (issue 15): mutated frames over its real libp2p inference and info protocols.

    python -m benchmarks.fuzz [--frames 1000000] [--seed 0] [--identities 4] [--workers 16]
                              [--max-s 3600] [--out bench-out/fuzz]

One real ``shiza node run`` process serving the whole small seeded test model (layers 0:6),
started with ``--ban-after 1000000000`` (strikes never add up to a ban, so every frame reaches
the decoder instead of being refused as RateLimited) and ``--peer-max-sessions 64``. Fuzzers are
``--identities`` libp2p hosts (own keys) with ``--workers`` concurrent streams in all. Each
stream carries mutations of valid frames until the node ends it:

    info       InfoRequest on the info protocol (the node answers one request per stream)
    open       OpenSession on the inference protocol
    step       a valid OpenSession, then mutated Steps: a mutation the node accepts gets a
               StepResult and the next mutated Step follows on the same stream
    cosign     a valid OpenSession and Step, then a mutated Countersign / Dispute / CloseSession

Mutations: bit flips, truncation, length-field lies (longer than sent, shorter, huge, zero),
nested arrays / maps, huge and negative ints, wrong types, missing / extra / duplicate keys,
bad strings, tensor headers lying about shape or dtype, random bytes. A stream the node does
not end within 10 s is reset by the fuzzer (``no_reply``). A health probe (an honest identity
asking InfoRequest, bounded to 10 s) runs every second; a crash is the node exiting or a probe
failing. The node's peak RSS is VmHWM of /proc/PID/status. At the end a real generation must
match the in-process greedy reference. Only the node process it started is killed, by pid.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

PROMPT = [1, 504, 3458, 282, 4649]
REPLY_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 10.0
NODE_ARGS = ["--ban-after", "1000000000", "--peer-max-sessions", "64"]


def vm_kib(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (VmHWM: peak RSS; VmRSS: now); 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- mutations -----------------------------------------------------------------------------

def _hdr(n: int) -> bytes:
    return struct.pack(">I", n & 0xFFFFFFFF)


def _weird_value(rng: random.Random) -> Any:
    """A value of some other type (msgpack-packable)."""
    choice = rng.randrange(14)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**32, -(2**31)])
    if choice == 3:
        return rng.choice([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324])
    if choice == 4:
        return "x" * rng.choice([0, 1, 100, 5000])
    if choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 8, 64, 65])))
    if choice == 6:
        return [rng.randrange(2**31) for _ in range(rng.choice([0, 1, 3, 100]))]
    if choice == 7:
        return {"v": 0, "t": "step", "x": [1, 2]}
    if choice == 8:
        return _nested(rng.randrange(1, 120), rng)
    if choice == 9:
        return {str(i): i for i in range(rng.choice([1, 10, 300]))}
    if choice == 10:
        return [[] for _ in range(rng.choice([10, 1000, 5000]))]
    if choice == 11:
        return {"dtype": rng.choice(["int64", "float32", "float64", "bool", "", "complex128"]),
                "shape": rng.choice([[], [1], [1, 1], [1, 2**31], [-1, 3], [2**40, 2**40], [0, 0]]),
                "data": bytes(rng.choice([0, 8, 24, 7]))}
    if choice == 12:
        return "\u00e9\ud7ff\ufffd" * rng.choice([1, 50])
    return rng.random() * 10 ** rng.randrange(-300, 300)


def _nested(depth: int, rng: random.Random) -> Any:
    v: Any = [] if rng.random() < 0.7 else {}
    for _ in range(depth):
        v = [v] if rng.random() < 0.7 else {"a": v}
    return v


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _raw_map(items: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map from already-packed keys and values (duplicates allowed)."""
    n = len(items)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in items)


def mutate(template: dict[str, Any], rng: random.Random) -> tuple[str, bytes]:
    """(mutation name, the raw bytes to send: header and payload) for a valid wire dict."""
    valid = _pack(template)
    kind = rng.randrange(16)
    if kind <= 2:  # bit flips
        b = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return "bitflip", _hdr(len(b)) + bytes(b)
    if kind == 3:
        k = rng.randrange(len(valid))
        return "truncate", _hdr(k) + valid[:k]
    if kind == 4:  # the header lies
        lie = rng.choice([len(valid) + rng.randint(1, 64), max(0, len(valid) - rng.randint(1, len(valid))), 0,
                          2**32 - 1, 64 * 2**10 + 1, 16 * 2**20, 2**31])
        return "length_lie", _hdr(lie) + valid
    if kind == 5:
        return "random_bytes", (_hdr(n := rng.randrange(1, 512)) + rng.randbytes(n))
    obj = dict(template)
    keys = [k for k in obj]
    if kind == 6:
        obj[rng.choice(keys)] = _weird_value(rng)
        name = "wrong_type"
    elif kind == 7:
        key = rng.choice(keys)
        return "huge_int", _hdr_payload(_raw_map([(_pack(k), _huge_int(rng) if k == key else _pack(v))
                                                   for k, v in obj.items()]))
    elif kind == 8:
        obj[rng.choice(keys)] = _nested(rng.choice([10, 31, 32, 33, 64, 200]), rng)
        name = "nested"
    elif kind == 9:
        del obj[rng.choice(keys)]
        name = "missing_key"
    elif kind == 10:
        obj[rng.choice(["x", "", "t2", "\x00", "v"])] = _weird_value(rng)
        name = "extra_key"
    elif kind == 11:
        key = rng.choice(keys)
        items = [(_pack(k), _pack(v)) for k, v in obj.items()] + [(_pack(key), _pack(_weird_value(rng)))]
        rng.shuffle(items)
        return "duplicate_key", _hdr_payload(_raw_map(items))
    elif kind == 12:
        obj["t"] = rng.choice(["info_req", "open", "step", "cosign", "close", "dispute", "error", "result",
                               "opened", "", "STEP", "launch_missiles"])
        obj["v"] = rng.choice([0, 1, 2, -1, 2**32, "0"])
        name = "type_version"
    elif kind == 13:  # invalid UTF-8 in a str
        key = rng.choice(keys)
        bad = b"\xa4\xff\xfe\xc0\x80"
        return "bad_utf8", _hdr_payload(_raw_map([(_pack(k), bad if k == key else _pack(v)) for k, v in obj.items()]))
    elif kind == 14:  # a tensor whose header lies
        tensors = [k for k, v in obj.items() if isinstance(v, dict) and "shape" in v]
        if tensors:
            k = rng.choice(tensors)
            t = dict(obj[k])
            field_ = rng.choice(["shape", "dtype", "data"])
            t[field_] = {"shape": rng.choice([[1, 2**20], [2**31, 2**31], [1], [1, 1, 1, 1, 1, 1, 1], [-5, 1],
                                              [1, 0], [3, 3]]),
                         "dtype": rng.choice(["float16", "bfloat16", "int32", "uint8", "int64", "object"]),
                         "data": rng.randbytes(rng.choice([0, 1, 7, 9, 24, 4096]))}[field_]
            obj[k] = t
        else:
            obj[rng.choice(keys)] = _weird_value(rng)
        name = "tensor_lie"
    else:  # not a map at all
        obj = rng.choice([list(template.values()), list(template.items()), template.get("t"), 42, None])
        name = "not_a_map"
    try:
        return name, _hdr_payload(_pack(obj))
    except (OverflowError, ValueError, TypeError):
        return "random_bytes", _hdr(8) + rng.randbytes(8)


def _code_name(code: int) -> str:
    """The protocol.errors class name of an error code (SPEC.md section 7), or "?"."""
    import protocol.errors as errors

    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, errors.ShizaError) and obj.__dict__.get("code") == code:
            return obj.__name__
    return "?"


def _hdr_payload(payload: bytes) -> bytes:
    return _hdr(len(payload)) + payload


def _huge_int(rng: random.Random) -> bytes:
    return rng.choice([b"\xcf" + b"\xff" * 8, b"\xd3" + b"\x80" + b"\x00" * 7, b"\xcf" + b"\x80" + b"\x00" * 7,
                       b"\xd3" + b"\xff" * 8, b"\xce\xff\xff\xff\xff", b"\xcb" + struct.pack(">d", 1e300)])


# ---- the fuzzer ----------------------------------------------------------------------------

@dataclass
class Stats:
    frames: int = 0  # mutated frames sent
    valid_frames: int = 0  # valid prefix frames sent
    streams: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # "error <code>", "ok <type>", "closed", ...
    mutations: dict[str, int] = field(default_factory=dict)
    probes: int = 0
    probe_failures: int = 0
    probe_max_s: float = 0.0
    crashed: str = ""

    def count(self, key: str) -> None:
        self.replies[key] = self.replies.get(key, 0) + 1


class Fuzzer:
    def __init__(self, node: Any, model_id: str, seed: int, frames: int, deadline: float) -> None:
        from protocol.messages import (CloseSession, Countersign, Dispute, InfoRequest, OpenSession,
                                       message_to_wire)
        from node.net.wire import int64_tensor
        from protocol.messages import Step

        self.node = node
        self.model_id = model_id
        self.seed = seed
        self.target = frames
        self.deadline = deadline
        self.stats = Stats()
        self.open_msg = OpenSession(model_id, 0, 6, 64)
        self.step_msg = Step(0, int64_tensor([PROMPT]), int64_tensor([list(range(len(PROMPT)))]))
        self.templates = {
            "info": message_to_wire(InfoRequest()),
            "open": message_to_wire(self.open_msg),
            "step": message_to_wire(self.step_msg),
            "cosign": [message_to_wire(Countersign("ab" * 16, bytes(64))), message_to_wire(Dispute("ab" * 16, "no")),
                       message_to_wire(CloseSession())],
        }
        self._wire = message_to_wire

    def done(self) -> bool:
        return self.stats.frames >= self.target or time.monotonic() > self.deadline or bool(self.stats.crashed)

    async def worker(self, host: Any, wid: int) -> None:
        from protocol.ids import INFERENCE_PROTOCOL, INFO_PROTOCOL

        rng = random.Random(self.seed * 1_000_003 + wid)
        while not self.done():
            case = rng.choice(("info", "info", "open", "step", "step", "cosign"))
            proto = INFO_PROTOCOL if case == "info" else INFERENCE_PROTOCOL
            try:
                stream = await host.open_stream(self.node.peer_id, proto)
            except Exception as exc:  # noqa: BLE001 - counted; the probe decides about crashes
                self.stats.count(f"open_stream failed: {type(exc).__name__}")
                await trio.sleep(0.05)
                continue
            self.stats.streams += 1
            try:
                await self._one_stream(stream, case, rng)
            finally:
                await stream.reset()

    async def _one_stream(self, stream: Any, case: str, rng: random.Random) -> None:
        from node.net.wire import recv_message, send_message
        from protocol.messages import SessionOpened, StepResult

        with trio.move_on_after(REPLY_TIMEOUT_S) as scope:
            if case in ("step", "cosign"):
                await send_message(stream, self.open_msg)
                self.stats.valid_frames += 1
                if not isinstance(await recv_message(stream), SessionOpened):
                    self.stats.count("valid open refused")
                    return
            if case == "cosign":
                await send_message(stream, self.step_msg)
                self.stats.valid_frames += 1
                if not isinstance(await recv_message(stream), StepResult):
                    self.stats.count("valid step refused")
                    return
            for _ in range(64):  # mutated frames on this stream while the node accepts them
                template = self.templates[case]
                if isinstance(template, list):
                    template = rng.choice(template)
                name, data = mutate(template, rng)
                self.stats.mutations[name] = self.stats.mutations.get(name, 0) + 1
                await stream.send(data)
                self.stats.frames += 1
                if name == "length_lie":
                    await stream.close()  # the node sees the stream end inside (or after) the frame
                reply = await self._reply(stream)
                if reply != "ok result" or self.done():
                    return
        if scope.cancelled_caught:
            self.stats.count("no_reply")

    async def _reply(self, stream: Any) -> str:
        from node.net.streams import StreamBroken
        from node.net.wire import recv_message
        from protocol.errors import ShizaError
        from protocol.messages import Error

        try:
            msg = await recv_message(stream)
        except StreamBroken:
            key = "stream_broken"
        except ShizaError as exc:
            key = f"undecodable reply {type(exc).__name__}"
        else:
            if msg is None:
                key = "closed"
            elif isinstance(msg, Error):
                key = f"error {msg.code} {_code_name(msg.code)}"
            else:
                key = f"ok {msg.TYPE}"
        self.stats.count(key)
        return key

    async def probe(self, host: Any) -> None:
        from node.net.wire import recv_message, send_message
        from protocol.ids import INFO_PROTOCOL
        from protocol.messages import InfoRequest, NodeInfo

        while not self.done():
            t = time.monotonic()
            ok = False
            with trio.move_on_after(PROBE_TIMEOUT_S):
                try:
                    s = await host.open_stream(self.node.peer_id, INFO_PROTOCOL)
                    await send_message(s, InfoRequest())
                    ok = isinstance(await recv_message(s), NodeInfo)
                    await s.close()
                except Exception:  # noqa: BLE001 - a failed probe is the finding
                    ok = False
            self.stats.probes += 1
            self.stats.probe_max_s = max(self.stats.probe_max_s, time.monotonic() - t)
            if self.node.proc.poll() is not None:
                self.stats.crashed = f"node exited with {self.node.proc.returncode}"
            elif not ok:
                self.stats.probe_failures += 1
                if self.stats.probe_failures >= 3:
                    self.stats.crashed = "node stopped answering the health probe (3 in a row)"
            else:
                self.stats.probe_failures = 0
            await trio.sleep(1.0)  # the probe's period, not synchronisation


async def fuzz_node(node: Any, model_id: str, *, frames: int, seed: int = 0, identities: int = 4,
                    workers: int = 16, max_s: float = 3600.0, progress: bool = True) -> dict[str, Any]:
    """Fuzz the running ``node`` (a localswarm.NodeProcess) with ``frames`` mutated frames."""
    from node.net.host import open_host

    t0 = time.monotonic()
    fz = Fuzzer(node, model_id, seed, frames, t0 + max_s)
    rss: list[tuple[float, int]] = []
    async with _hosts(identities + 1, open_host) as hosts:
        for h in hosts:
            await h.connect(node.addr)

        async def report() -> None:
            last = (t0, 0)
            while not fz.done():
                await trio.sleep(5 if progress else 1)
                now = time.monotonic()
                rss.append((now - t0, vm_kib(node.proc.pid, "VmRSS")))
                if progress:
                    rate = (fz.stats.frames - last[1]) / (now - last[0])
                    print(f"[fuzz {now - t0:7.1f}s] {fz.stats.frames} frames ({rate:.0f}/s), "
                          f"{fz.stats.streams} streams, RSS {rss[-1][1] / 1024:.0f} MiB, "
                          f"probes {fz.stats.probes} (max {fz.stats.probe_max_s:.2f} s)", flush=True)
                    last = (now, fz.stats.frames)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fz.probe, hosts[0])
            nursery.start_soon(report)
            async with trio.open_nursery() as fuzzers:
                for w in range(workers):
                    fuzzers.start_soon(fz.worker, hosts[1 + w % identities], w)
    elapsed = time.monotonic() - t0
    s = fz.stats
    return {
        "frames": s.frames, "valid_prefix_frames": s.valid_frames, "streams": s.streams,
        "elapsed_s": elapsed, "frames_per_s": s.frames / elapsed if elapsed > 0 else 0.0,
        "seconds_per_million": 1e6 / (s.frames / elapsed) if s.frames else None,
        "crashes": 1 if s.crashed or node.proc.poll() is not None else 0, "crash": s.crashed,
        "replies": dict(sorted(s.replies.items(), key=lambda kv: -kv[1])),
        "mutations": dict(sorted(s.mutations.items())),
        "probes": s.probes, "probe_max_s": s.probe_max_s,
        "node_peak_rss_kib": vm_kib(node.proc.pid, "VmHWM"), "rss_samples": rss,
        "identities": identities, "workers": workers, "node_args": NODE_ARGS,
    }


class _hosts:
    """``n`` libp2p hosts with fresh identities, open together (an async context manager)."""

    def __init__(self, n: int, open_host: Any) -> None:
        from contextlib import AsyncExitStack

        from protocol.identity import Identity

        self._n, self._open = n, open_host
        self._stack = AsyncExitStack()
        self._ids = [Identity.generate() for _ in range(n)]

    async def __aenter__(self) -> list[Any]:
        return [await self._stack.enter_async_context(self._open(i.seed)) for i in self._ids]

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


async def generation_after(node: Any, model_path: str) -> bool:
    """A real generation through the fuzzed node equals the in-process greedy reference."""
    from node.client.swarm import SwarmClient
    from node.engine.reference import reference_greedy
    from node.engine.registry import resolve_model

    source = resolve_model(model_path)
    expected = await trio.to_thread.run_sync(reference_greedy, source, PROMPT, 5)
    with trio.fail_after(120):
        async with SwarmClient.open([node.addr]) as client:
            await client.wait_for_route(source.model_id, 60)
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=5)
    return result.token_ids[0] == expected


def start_fuzz_target(root: Path) -> tuple[Any, str]:
    """The tiny seeded model and one node process serving all of it (blocking)."""
    from node.devtools.localswarm import start_node
    from node.engine.testing import make_tiny_model

    model = make_tiny_model(root / "tiny-model", seed=0, arch="llama", num_layers=6)
    node = start_node(root / "node", model=str(model), layers=(0, 6), extra_args=NODE_ARGS)
    try:
        node.wait_ready(180)
    except BaseException:
        node.kill()
        raise
    return node, str(model)


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    samples = result["rss_samples"]
    ax1.plot([t for t, _ in samples], [k / 1024 for _, k in samples])
    ax1.axhline(result["node_peak_rss_kib"] / 1024, ls="--", color="tab:red", label="peak (VmHWM)")
    ax1.set_xlabel("seconds")
    ax1.set_ylabel("node RSS (MiB)")
    ax1.set_title(f"{result['frames']} mutated frames, {result['frames_per_s']:.0f}/s, crashes {result['crashes']}")
    ax1.legend(fontsize=8)
    top = list(result["replies"].items())[:12]
    ax2.barh([k for k, _ in top][::-1], [v for _, v in top][::-1])
    ax2.set_xscale("log")
    ax2.set_title("replies")
    ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--max-s", type=float, default=3600.0, help="bound on the fuzzing time")
    ap.add_argument("--out", type=Path, default=Path("bench-out/fuzz"))
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="shiza-fuzz-"))
    node = None
    try:
        node, model = start_fuzz_target(root)
        print(f"fuzzing node {node.peer_id} (pid {node.proc.pid}) with {args.frames} frames", flush=True)
        result = trio.run(lambda: fuzz_node(node, _model_id(model), frames=args.frames, seed=args.seed,
                                            identities=args.identities, workers=args.workers, max_s=args.max_s))
        alive = node.proc.poll() is None
        result["generation_after_matches"] = trio.run(generation_after, node, model) if alive else False
        result["node_peak_rss_kib"] = vm_kib(node.proc.pid, "VmHWM") or result["node_peak_rss_kib"]
        result["node_exit"] = node.stop(60)
    finally:
        if node is not None:
            node.kill()
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    plotted = plot(result, args.out / "fuzz.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_samples",)}, indent=1))
    print(f"wrote {args.out / 'results.json'}" + (f" and {args.out / 'fuzz.png'}" if plotted else ""))
    return 0 if result["crashes"] == 0 and result["generation_after_matches"] else 1


def _model_id(model_path: str) -> str:
    from node.engine.registry import resolve_model

    return resolve_model(model_path).model_id


if __name__ == "__main__":
    sys.exit(main())
