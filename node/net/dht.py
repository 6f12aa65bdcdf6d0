"""The swarm's Kademlia DHT: py-libp2p's KadDHT with its traps worked around.

`open_dht(host, validators, selectors, bootstrap)` runs a KadDHT in server mode
for the life of an `async with` block and yields a `SwarmDHT`. What it changes
from py-libp2p 0.8.1 (see FACTS.md):

* Strict namespaces: only keys "/<namespace>/<rest>" whose namespace has a
  validator are stored, served or returned, locally and by every remote peer
  running this code. The default /pk and /ipns namespaces are not installed.
* `get` always asks the network. py-libp2p's `get_value` returns the local copy
  for up to 24 h; here the local copy is only one candidate among the peers'
  answers, every candidate is validated again, and the namespace selector
  picks the winner, which then replaces the local copy and stale replicas.
* `put` returns how many remote peers accepted the record (py-libp2p reports
  nothing, so a record stored only locally went unnoticed).
* `find_providers` asks the network (py-libp2p answers from its local cache as
  soon as it holds one provider), removes duplicates and records the
  providers' addresses in the peerstore so `Host.open_stream` can dial them.
* Routing lookups use the sha2-256 multihash of the key as the Kademlia target:
  py-libp2p peers reset FIND_NODE for targets over 50 bytes that are not
  multihashes (any "/ns/<peer id>" key), which silently shrank lookups to the
  local routing table.
* The WARNING that py-libp2p logs for every rejected record, with the whole
  value in hex, is demoted to DEBUG and truncated.

* Provider lists (SPEC.md 12.4.7): py-libp2p keeps the first 20 providers of
  a key for 48 h and ignores every later one, so once 20 nodes had ever
  served a model no new node serving it could be found. Here a key holds up
  to `MAX_PROVIDERS_PER_KEY` providers, an entry expires `PROVIDER_TTL_S`
  after its last announcement, and a full key refuses new providers until an
  entry expires: announcing is free for a fresh identity, so if newcomers
  could evict, a flood of them would push out every honest provider.
* `get_from(peer, key)` asks one peer, one request, for a value: a reader
  fetching capacity records asks each provider for its own record first.
* Inbound bursts wait instead of being dropped: py-libp2p serves at most 12
  inbound DHT streams at once and resets every stream beyond that unread, and
  ADD_PROVIDER has no answer, so when many nodes announced a model at once
  the peers closest to its key silently lost most announcements. Here a
  stream beyond the 12 waits up to `INBOUND_WAIT_S` for a slot, at most
  `INBOUND_WAITING_MAX` of them at once; only beyond those is it reset. A
  stream holds a slot at most `INBOUND_HOLD_S` (an abandoned one held it for
  good).
* Joining looks up our own id (`join_lookup`); py-libp2p's routing-table
  refresh does nothing with its random walk off, so a node knew only its
  bootstrap peers.

What it cannot change: values live 24 h on remote peers with no per-record
TTL and no deletion, so validators must check an expiry inside the value, and
readers must re-check it (validators run on every read). Peers running other
code keep py-libp2p's provider policy.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import ALPHA, PROTOCOL_ID as KAD_PROTOCOL_ID, QUERY_TIMEOUT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.provider_store import ProviderRecord
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.utils import InvalidRecordType, split_key
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service

from node.net._libp2p import quiet_dht_logs, to_id
from node.net.host import Host

__all__ = [
    "DHTError",
    "MAX_PROVIDERS_PER_KEY",
    "PROVIDER_TTL_S",
    "SelectFn",
    "StaleValue",
    "SwarmDHT",
    "ValidateFn",
    "open_dht",
    "provider_key",
    "routing_key",
]

log = logging.getLogger(__name__)

ValidateFn = Callable[[str, bytes], None]
SelectFn = Callable[[str, list[bytes]], int]
# Told of every network operation: (operation, "ok" or "error", seconds). Called in the trio
# thread once the operation ends; it must return at once (node/http/metrics.py counts them).
DhtObserver = Callable[[str, str, float], None]


def _observed(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Report one SwarmDHT operation to the DHT's observer, if it has one."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def observed(self: "SwarmDHT", *args: Any, **kwargs: Any) -> Any:
            if self.observer is None:
                return await method(self, *args, **kwargs)
            t0 = time.monotonic()
            outcome = "error"
            try:
                result = await method(self, *args, **kwargs)
                outcome = "ok"
                return result
            finally:
                self.observer(op, outcome, time.monotonic() - t0)

        return observed

    return wrap

_SHA2_256 = b"\x12\x20"  # multihash code 0x12, length 32
MAX_PROVIDERS_PER_KEY = 256  # providers one DHT node keeps per key (py-libp2p: 20)
PROVIDER_TTL_S = 3600.0  # an entry lives this long after its last announcement (py-libp2p: 48 h)
INBOUND_WAIT_S = 5.0  # an inbound DHT stream waits this long for one of py-libp2p's 12 handler slots
INBOUND_WAITING_MAX = 256  # streams waiting at once; one more is reset unread, as py-libp2p does
# A request is one message and its answer on a stream of its own, so a stream still open after
# this long was abandoned: py-libp2p's requests close their stream in a `finally` that a cancelled
# requester never reaches, and its handler then waited for the next message forever, one of the
# 12 slots gone for the connection's life. Past this it is reset and its slot freed.
INBOUND_HOLD_S = float(QUERY_TIMEOUT)


class DHTError(Exception):
    """A DHT operation was refused locally (bad key, invalid value)."""


class StaleValue(DHTError):
    """`put` of a value the selector ranks below the copy already held."""


def routing_key(key: bytes) -> bytes:
    """The Kademlia target used to find the peers responsible for `key`."""
    return _SHA2_256 + hashlib.sha256(key).digest()


def provider_key(key: bytes) -> bytes:
    """The provider-record key on the wire for an application key `key`.

    A sha2-256 multihash, which is what py-libp2p and go-libp2p accept.
    """
    return routing_key(key)


def select_largest(key: str, values: list[bytes]) -> int:
    """Default selector: the bytewise largest value (deterministic everywhere)."""
    return max(range(len(values)), key=lambda i: values[i])


def _namespaced(key: str) -> bytes:
    """`key` as the bytes of a record key; DHTError unless it is "/<namespace>/<rest>"."""
    try:
        split_key(key)
    except InvalidRecordType as exc:
        raise DHTError(f"not a namespaced key: {key!r}") from exc
    return key.encode()


class _NamespaceValidator(Validator):
    def __init__(self, validate: ValidateFn, select: SelectFn) -> None:
        self._validate = validate
        self._select = select

    def validate(self, key: str, value: bytes) -> None:
        self._validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        index = self._select(key, values)
        if not 0 <= index < len(values):
            raise ValueError(f"selector for {key!r} returned index {index} of {len(values)}")
        return index


class _ProviderPolicy:
    """Replaces a py-libp2p ProviderStore's add/get/cleanup (its handlers call these):
    at most ``max_per_key`` providers per key, each expiring ``ttl_s`` after it was last
    announced. A provider already listed refreshes its entry in place; a new provider for a
    full key is refused while every entry is fresh. Evicting a provider then means waiting
    out its TTL, which never happens to one that re-announces (every half TTL, 12.4.2),
    however many identities the newcomers have."""

    def __init__(self, store: Any, max_per_key: int, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.max_per_key, self.ttl_s, self.clock = store, max_per_key, ttl_s, clock
        store.add_provider = self.add_provider
        store.get_providers = self.get_providers
        store.cleanup_expired = self.cleanup_expired

    def add_provider(self, key: bytes, provider: Any) -> None:
        if not provider or not provider.peer_id:
            return
        now = self.clock()
        entries = self.store.providers.setdefault(key, {})
        pid = str(provider.peer_id)
        if pid not in entries and len(entries) >= self.max_per_key:
            self._expire(key, now)
            entries = self.store.providers.setdefault(key, {})  # _expire drops an empty key
            if len(entries) >= self.max_per_key:
                log.debug("provider list for %s full: refusing new provider %s", key.hex(), pid)
                return
        entries.pop(pid, None)  # re-announced: newest last
        entries[pid] = ProviderRecord(provider_info=provider, timestamp=now)

    def _expire(self, key: bytes, now: float) -> None:
        entries = self.store.providers.get(key, {})
        for pid in [p for p, r in entries.items() if now - r.timestamp >= self.ttl_s]:
            del entries[pid]
        if not entries:
            self.store.providers.pop(key, None)

    def get_providers(self, key: bytes) -> list[Any]:
        self._expire(key, self.clock())
        return [PeerInfo(r.peer_id, r.addresses)
                for r in self.store.providers.get(key, {}).values()]

    def cleanup_expired(self) -> None:
        now = self.clock()
        for key in list(self.store.providers):
            self._expire(key, now)


class SwarmDHT:
    """A Kademlia DHT node bound to one `Host`; see the module docstring.

    Build it with `open_dht`, which also runs it. Every network method is
    bounded internally (10 s per remote query, at most 10 in flight, lookups
    capped at 30 s by py-libp2p); wrap calls in `trio.fail_after` for tighter
    deadlines. Cancelling one abandons its remote queries; local state stays
    consistent (local writes happen without awaiting).
    """

    def __init__(
        self,
        host: Host,
        validators: dict[str, ValidateFn],
        selectors: dict[str, SelectFn] | None = None,
        *,
        observer: DhtObserver | None = None,
    ) -> None:
        selectors = selectors or {}
        self.observer = observer
        unknown = set(selectors) - set(validators)
        if unknown:
            raise ValueError(f"selectors for namespaces without validators: {sorted(unknown)}")
        quiet_dht_logs()
        self.host = host
        namespaced = NamespacedValidator(
            {
                ns: _NamespaceValidator(fn, selectors.get(ns, select_largest))
                for ns, fn in validators.items()
            },
            strict_validation=True,
        )
        self._validator = namespaced
        self.kad = KadDHT(
            host.libp2p,
            DHTMode.SERVER,
            validator=namespaced,
            validator_changed=True,  # keep out the default /pk and /ipns
            strict_validation=True,
        )
        self._local_id = host.libp2p.get_id()
        self.providers = _ProviderPolicy(self.kad.provider_store, MAX_PROVIDERS_PER_KEY,
                                         PROVIDER_TTL_S)
        self.inbound_waiting = 0
        self.inbound_refused = 0  # streams reset unread: too many waiting, or waited too long
        host.libp2p.set_stream_handler(KAD_PROTOCOL_ID, self._handle_kad_stream)

    async def _handle_kad_stream(self, stream: Any) -> None:
        """py-libp2p's handler, except that a stream finding every slot taken waits for one
        (bounded in time and in count) instead of being reset unread, and that a stream holds
        its slot for at most INBOUND_HOLD_S."""
        limiter = self.kad._inbound_limiter
        if self.inbound_waiting >= INBOUND_WAITING_MAX:
            await self._refuse(stream)
            return
        acquired = False
        self.inbound_waiting += 1
        try:
            with trio.move_on_after(INBOUND_WAIT_S):
                await limiter.acquire()
                acquired = True
        finally:
            self.inbound_waiting -= 1
        if not acquired:
            await self._refuse(stream)
            return
        try:
            with trio.move_on_after(INBOUND_HOLD_S) as held:
                await self.kad._do_handle_stream(stream)
            if held.cancelled_caught:
                await self._refuse(stream)
        finally:
            limiter.release()

    async def _refuse(self, stream: Any) -> None:
        self.inbound_refused += 1
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001 - the stream may already be gone
            pass

    # -- membership -----------------------------------------------------------

    async def bootstrap(self, maddrs: Iterable[str]) -> int:
        """Connect to `maddrs`, add them to the routing table, refresh it.

        Returns how many bootstrap peers were reached; unreachable ones are
        logged and skipped. With none (a first node), this starts a new swarm.
        """
        reached = 0
        for maddr in maddrs:
            try:
                peer_id = await self.host.connect(maddr)
            except Exception as exc:  # py-libp2p raises many kinds on a failed dial
                log.warning("bootstrap peer %s unreachable: %s", maddr, exc)
                continue
            reached += 1
            await self.kad.add_peer(to_id(peer_id), skip_server_mode_check=True)
        if reached:
            await self.join_lookup()
        return reached

    async def join_lookup(self) -> int:
        """Kademlia's join: look up our own id, and keep every peer the lookup met.

        py-libp2p's ``refresh_routing_table`` does nothing unless its random walk is on (it is
        off here), so a node used to know only its bootstrap peers: when many joined at once,
        each announced its records to the "closest peers" of a one-peer table, readers asked
        the really closest ones, and 56 of 100 providers of a model could not be found
        (benchmarks/wan/discovery.py). The lookup fills the buckets near us, and every peer
        it queries adds us to its own table (an inbound KAD stream does). Returns the size of
        the routing table after it."""
        with trio.move_on_after(QUERY_TIMEOUT * 3):
            found = await self.kad.peer_routing.find_closest_peers_network(self._local_id.to_bytes())
            for peer in found:
                if peer != self._local_id:
                    await self.kad.add_peer(peer, skip_server_mode_check=True)
        return len(self.kad.routing_table.get_peer_ids())

    def routing_table_peers(self) -> list[str]:
        return [p.to_base58() for p in self.kad.routing_table.get_peer_ids()]

    # -- values ---------------------------------------------------------------

    def _check(self, key: str, value: bytes) -> None:
        try:
            split_key(key)
            self._validator.validate(key, value)
        except InvalidRecordType as exc:
            raise DHTError(f"no validator for key {key!r}") from exc

    async def _closest_peers(self, key_bytes: bytes) -> list[ID]:
        peers = await self.kad.peer_routing.find_closest_peers_network(routing_key(key_bytes))
        return [p for p in peers if p != self._local_id]

    @_observed("put")
    async def put(self, key: str, value: bytes) -> int:
        """Store `value` locally and at the peers closest to `key`.

        Raises DHTError if the key's namespace has no validator, the
        validator's own exception if it rejects `value`, and StaleValue if the
        local copy is newer by the selector. Returns the number of remote
        peers that accepted it (0 means stored only locally).
        """
        self._check(key, value)
        key_bytes = key.encode()
        held = self.kad.value_store.get(key_bytes)
        if held is not None and held.value != value:
            if self._validator.select(key, [value, held.value]) != 0:
                raise StaleValue(f"a newer value is already held for {key!r}")
        self.kad.value_store.put(key_bytes, value)

        stored = 0
        limiter = trio.CapacityLimiter(ALPHA)

        async def store_at(peer: ID) -> None:
            nonlocal stored
            async with limiter:
                with trio.move_on_after(QUERY_TIMEOUT):
                    if await self.kad.value_store._store_at_peer(peer, key_bytes, value):
                        stored += 1

        peers = await self._closest_peers(key_bytes)
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(store_at, peer)
        return stored

    @_observed("get")
    async def get(self, key: str) -> bytes | None:
        """The best valid value for `key` among the network's copies and ours.

        Asks the closest peers every time. Each candidate is validated again
        (invalid or expired ones are dropped; an invalid local copy is
        deleted), the namespace selector picks the winner, the winner replaces
        the local copy, and peers that returned a worse value are sent the
        winner (bounded, best effort). None if no valid value exists.
        """
        key_bytes = _namespaced(key)
        records: list[Record] = []
        sources: list[ID | None] = []  # None = our local store

        local = self.kad.value_store.get(key_bytes)
        if local is not None:
            if self._valid(key, local.value):
                records.append(local)
                sources.append(None)
            else:
                self.remove_local(key)

        limiter = trio.CapacityLimiter(ALPHA)

        async def ask(peer: ID) -> None:
            async with limiter:
                with trio.move_on_after(QUERY_TIMEOUT):
                    rec = await self.kad.value_store._get_from_peer(
                        peer, key_bytes, return_record=True
                    )
                    if isinstance(rec, Record) and rec.value and self._valid(key, rec.value):
                        records.append(rec)
                        sources.append(peer)

        peers = await self._closest_peers(key_bytes)
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)

        if not records:
            return None
        values = [r.value for r in records]
        best_index = self._validator.select(key, values)
        best = records[best_index]
        if local is None or local.value != best.value:
            self.kad.value_store.put_record(key_bytes, best)
        stale = [p for p, r in zip(sources, records) if p is not None and r.value != best.value]
        if stale:
            async with trio.open_nursery() as nursery:
                for peer in stale:
                    nursery.start_soon(self._correct, peer, key_bytes, best)
        return best.value

    async def get_from(self, peer_id: str, key: str, timeout_s: float = QUERY_TIMEOUT) -> bytes | None:
        """One GET_VALUE for `key` sent to `peer_id` alone: its valid value, or None (no
        answer within `timeout_s`, no value, an invalid one, or the peer is unreachable).
        Nothing is stored locally; the caller knows whose copy it asked for."""
        key_bytes = _namespaced(key)
        peer = to_id(peer_id)
        if peer == self._local_id:
            return self.get_local(key)
        with trio.move_on_after(timeout_s):
            try:
                rec = await self.kad.value_store._get_from_peer(peer, key_bytes, return_record=True)
            except Exception as exc:  # noqa: BLE001 - unreachable or misbehaving peer
                log.debug("GET_VALUE to %s failed: %s", peer_id, exc)
                return None
            if isinstance(rec, Record) and rec.value and self._valid(key, rec.value):
                return bytes(rec.value)
        return None

    async def _correct(self, peer: ID, key_bytes: bytes, best: Record) -> None:
        with trio.move_on_after(QUERY_TIMEOUT):
            await self.kad.value_store._store_at_peer(peer, key_bytes, best.value, record=best)

    def _valid(self, key: str, value: bytes) -> bool:
        try:
            self._validator.validate(key, value)
        except Exception as exc:  # a validator may raise anything on bad input
            log.debug("dropping invalid value for %s: %s", key, exc)
            return False
        return True

    def get_local(self, key: str) -> bytes | None:
        """The locally held copy, re-validated; no network traffic."""
        record = self.kad.value_store.get(key.encode())
        if record is None or not self._valid(key, record.value):
            return None
        return record.value

    def remove_local(self, key: str) -> bool:
        """Forget the local copy of `key` and stop republishing it.

        Copies already stored at other peers stay until they expire (24 h in
        py-libp2p); to withdraw a record, publish a newer one that says so.
        """
        key_bytes = key.encode()
        self.kad.value_store.local_keys.discard(key_bytes)
        return self.kad.value_store.remove(key_bytes)

    # -- providers ------------------------------------------------------------

    @_observed("provide")
    async def provide(self, key: bytes) -> bool:
        """Announce this node as a provider of `key` to the closest peers.

        Returns whether at least one remote peer was sent the announcement
        (ADD_PROVIDER is fire-and-forget; there is no acknowledgement).
        """
        return await self.kad.provider_store.provide(provider_key(key))

    def stop_providing(self, key: bytes) -> None:
        """Stop announcing `key` and drop our own local provider entry.

        Remote provider records stay until they expire (PROVIDER_TTL_S on nodes running
        this code, 48 h on plain py-libp2p peers).
        """
        pkey = provider_key(key)
        store = self.kad.provider_store
        store.providing_keys.discard(pkey)
        entries = store.providers.get(pkey)
        if entries is not None:
            entries.pop(str(self._local_id), None)
            if not entries:
                del store.providers[pkey]

    @_observed("find_providers")
    async def find_providers(self, key: bytes, count: int = 50) -> list[str]:
        """Up to `count` distinct provider peer ids for `key`, asking the network.

        Our own id is included if we provide `key`. Each provider's addresses
        go into the peerstore, so `Host.open_stream(peer_id, ...)` can dial it.
        """
        pkey = provider_key(key)
        store = self.kad.provider_store
        found: dict[ID, list] = {}

        def merge(infos: Iterable) -> None:
            for info in infos:
                addrs = found.setdefault(info.peer_id, [])
                addrs.extend(a for a in info.addrs if a not in addrs)

        merge(store.get_providers(pkey))
        limiter = trio.CapacityLimiter(ALPHA)

        async def ask(peer: ID) -> None:
            async with limiter:
                with trio.move_on_after(QUERY_TIMEOUT):
                    try:
                        infos, _closer = await store._get_providers_from_peer_with_closers(
                            peer, pkey
                        )
                    except Exception as exc:
                        log.debug("GET_PROVIDERS to %s failed: %s", peer, exc)
                        return
                    merge(infos)

        peers = await self._closest_peers_for(pkey)
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)

        peerstore = self.host.libp2p.get_peerstore()
        result: list[str] = []
        for peer_id, addrs in found.items():
            if peer_id != self._local_id and addrs:
                peerstore.add_addrs(peer_id, addrs, 6 * 60 * 60)
            result.append(peer_id.to_base58())
            if len(result) >= count:
                break
        return result

    async def _closest_peers_for(self, target: bytes) -> list[ID]:
        # Provider keys are already multihashes: look them up as they are,
        # as py-libp2p's provide() does, so both land on the same peers.
        peers = await self.kad.peer_routing.find_closest_peers_network(target)
        return [p for p in peers if p != self._local_id]


@asynccontextmanager
async def open_dht(
    host: Host,
    validators: dict[str, ValidateFn],
    selectors: dict[str, SelectFn] | None = None,
    bootstrap: Iterable[str] = (),
    *,
    observer: DhtObserver | None = None,
) -> AsyncIterator[SwarmDHT]:
    """Run a SwarmDHT on `host` and bootstrap it from `bootstrap` multiaddrs.

    `validators` maps a namespace ("shiza-cap" for keys "/shiza-cap/...") to a
    function (key, value) that raises on an invalid value; `selectors` maps a
    namespace to a function (key, values) returning the index of the best
    value (default: the bytewise largest). Yields once bootstrapped (or at
    once with no bootstrap peers: a new swarm). Leaving the block stops the
    DHT service; the host keeps running.
    """
    dht = SwarmDHT(host, validators, selectors, observer=observer)
    async with background_trio_service(dht.kad):
        await dht.bootstrap(bootstrap)
        yield dht
