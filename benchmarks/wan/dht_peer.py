"""One lightweight DHT process for the discovery benchmark: no model, only records.

    python -m benchmarks.wan.dht_peer peer   --model M --layers 32 --span 4:8 [--bootstrap ADDR]
    python -m benchmarks.wan.dht_peer client --model M --layers 32 --bootstrap ADDR

Run by benchmarks/wan/discovery.py inside a network namespace. Both roles open a real libp2p host
(listening on 0.0.0.0, so they advertise the namespace's address) and the swarm's DHT
(node/net/dht.py, with the record validators of node/net/records.py), bootstrap, and print one JSON
line ``{"ready": ...}``. Then they read one command per line on stdin and answer each with one JSON
line on stdout; end of input ends the process (the driver's pipe closing, or the driver dying).

A peer: ``publish`` signs its capacity record for ``--span`` of ``--model``, stores it and announces
itself as a provider of the model, exactly as a node's Announcer does (node/serve/announce.py), and
keeps refreshing it; it answers ``{"published": <wall time>, "requests": {...}}`` (the requests
that publishing sent, by type).

A client: ``coverage T0 N TIMEOUT`` asks the network for the model's records (fetch_records, the
reader every client and node uses) until every layer is served and until N records are seen, and
answers the seconds since T0 (a wall-clock time; 0 means now) at which each happened; ``lookup
PEER_ID`` times one warm fetch of every record, one Kademlia lookup (FIND_NODE rounds for a random
key) and one DHT lookup of PEER_ID's record (the lookup plus GET_VALUE at the closest peers), with
the requests each sent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any, Sequence

# what each request type is called on py-libp2p's objects (counted for the lookup report)
_COUNTED = (("peer_routing", "_query_peer_for_closest", "find_node"),
            ("value_store", "_get_from_peer", "get_value"),
            ("value_store", "_store_at_peer", "put_value"),
            ("provider_store", "_get_providers_from_peer_with_closers", "get_providers"),
            ("provider_store", "_send_add_provider", "add_provider"))


def fully_covered(records: Sequence[Any], model_id: str, num_layers: int) -> bool:
    """Whether the records together serve every layer of ``model_id``."""
    from node.client.routing import missing_layers

    return not missing_layers(num_layers, [(s.start, s.end) for r in records for s in r.spans
                                           if s.model_id == model_id])


def count_requests(dht: Any) -> Counter:
    """Count the Kademlia requests ``dht`` (a SwarmDHT) sends, by type, from now on."""
    counts: Counter = Counter()
    for owner, name, label in _COUNTED:
        obj = getattr(dht.kad, owner)
        inner = getattr(obj, name)

        def counted(*args: Any, _inner: Any = inner, _label: str = label, **kw: Any) -> Any:
            counts[_label] += 1
            return _inner(*args, **kw)

        setattr(obj, name, counted)
    return counts


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _lines():  # noqa: ANN202 - an async generator of stdin lines, None at end of input
    import trio

    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return
        yield line.split()


async def run(args: argparse.Namespace) -> None:
    import trio

    from node.net.dht import open_dht
    from node.net.host import open_host
    from node.net.records import DHT_SELECTORS, DHT_VALIDATORS
    from node.serve.announce import Announcer, RecordState
    from protocol.identity import Identity
    from protocol.messages import ServedSpan
    from protocol.records import Hardware

    ident = Identity.generate()
    async with open_host(ident.seed, "/ip4/0.0.0.0/tcp/0") as host:
        t_boot = time.time()
        async with open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, args.bootstrap or ()) as dht:
            counts = count_requests(dht)
            _say({"ready": True, "peer_id": ident.peer_id, "addrs": list(host.addrs),
                  "bootstrap_s": round(time.time() - t_boot, 3),
                  "routing_table": len(dht.routing_table_peers())})
            async with trio.open_nursery() as nursery:
                async for words in _lines():
                    if not words:
                        continue
                    cmd = words[0]
                    if cmd == "publish" and args.role == "peer":
                        a, b = (int(x) for x in args.span.split(":"))
                        state = RecordState(addrs=tuple(host.addrs),
                                            spans=(ServedSpan(args.model, a, b, args.layers),),
                                            hardware=Hardware("cpu", "bench", 8 << 30, 4 << 30),
                                            throughput=10.0, cache_tokens_left=4096)
                        ann = Announcer(ident, dht, state, ttl_s=600, provide_keys=(args.model,))
                        counts.clear()
                        await nursery.start(ann.serve)
                        _say({"published": time.time(), "requests": dict(counts)})
                    elif cmd == "coverage" and args.role == "client":
                        _say(await _coverage(dht, args, float(words[1]) or time.time(), int(words[2]),
                                             float(words[3])))
                    elif cmd == "lookup" and args.role == "client":
                        _say(await _lookup(dht, args, words[1], counts))
                    else:
                        _say({"error": f"unknown command for a {args.role}: {' '.join(words)}"})
                nursery.cancel_scope.cancel()


async def _coverage(dht: Any, args: argparse.Namespace, t0: float, n: int, timeout_s: float) -> dict:
    import trio

    from node.net.records import fetch_records

    full_s = all_s = None
    polls = 0
    seen = 0
    with trio.move_on_after(timeout_s):
        while full_s is None or all_s is None:
            records = await fetch_records(dht, args.model)
            polls += 1
            seen = max(seen, len(records))
            now = time.time() - t0
            if full_s is None and fully_covered(records, args.model, args.layers):
                full_s = now
            if all_s is None and len(records) >= n:
                all_s = now
            if full_s is None or all_s is None:
                await trio.sleep(0.1)
    return {"full_coverage_s": _r(full_s), "all_records_s": _r(all_s), "records_seen": seen, "polls": polls}


async def _lookup(dht: Any, args: argparse.Namespace, peer_id: str, counts: Counter) -> dict:
    from node.net.records import fetch_records
    from protocol.ids import capacity_key

    out: dict[str, Any] = {}
    counts.clear()
    t = time.perf_counter()
    records = await fetch_records(dht, args.model)
    out["fetch_all_s"] = _r(time.perf_counter() - t)
    out["fetch_all_records"] = len(records)
    out["fetch_all_requests"] = dict(counts)

    counts.clear()
    t = time.perf_counter()
    closest = await dht.kad.peer_routing.find_closest_peers_network(os.urandom(32))
    out["find_node_s"] = _r(time.perf_counter() - t)
    out["find_node_requests"] = dict(counts)
    out["find_node_found"] = len(closest)

    counts.clear()
    t = time.perf_counter()
    value = await dht.get(capacity_key(peer_id))
    out["get_record_s"] = _r(time.perf_counter() - t)
    out["get_record_found"] = value is not None
    out["get_record_requests"] = dict(counts)
    out["routing_table"] = len(dht.routing_table_peers())
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan.dht_peer", description=__doc__.split("\n")[0])
    p.add_argument("role", choices=("peer", "client"))
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--span", default=None, help="A:B, the layers this peer says it serves (peers only)")
    p.add_argument("--bootstrap", action="append", default=[])
    args = p.parse_args(argv)
    if args.role == "peer" and not args.span:
        p.error("a peer needs --span A:B")
    import trio

    trio.run(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
