"""node.swarmkey on loopback: admission by swarm key gates every other protocol."""

from __future__ import annotations

import hashlib
import os
from contextlib import AsyncExitStack

import pytest
import trio

from node.net.host import Stream, StreamBroken, open_host
from node.net.admission import SwarmKey, SwarmKeyError, open_admission, write_swarm_key
from node.net.wire import recv_message
from protocol.messages import Error

ECHO = "/shiza-test/echo/1.0.0"
SHIZA_ECHO = "/shiza/test-echo/0.1.0"
KEY = SwarmKey(b"k" * 32)
TIMEOUT = 30


def seed(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


async def echo(stream: Stream) -> None:
    while (payload := await stream.read_frame(1024)) is not None:
        await stream.send_frame(payload)


async def _host(stack: AsyncExitStack, name: str, key: SwarmKey | None):
    host = await stack.enter_async_context(open_host(seed(name)))
    admission = await stack.enter_async_context(open_admission(host, key))
    host.set_handler(ECHO, echo)
    host.set_handler(SHIZA_ECHO, echo)
    return host, admission


async def _echo_ok(a, b, proto: str = ECHO) -> bool:
    await a.connect(b.addrs[0])
    try:
        stream = await a.open_stream(b.peer_id, proto)
        await stream.send_frame(b"hi")
        return await stream.read_frame(1024) == b"hi"
    except StreamBroken:
        return False


async def test_same_key_admits_both_ways() -> None:
    with trio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            (a, adm_a), (b, adm_b) = await _host(stack, "a", KEY), await _host(stack, "b", KEY)
            assert await _echo_ok(a, b)
            assert await adm_a.wait(b.peer_id) and await adm_b.wait(a.peer_id)
            stream = await b.open_stream(a.peer_id, ECHO)  # and the other way on the same connection
            await stream.send_frame(b"x")
            assert await stream.read_frame(16) == b"x"


@pytest.mark.parametrize("outsider_key", [None, SwarmKey(b"w" * 32)], ids=["no-key", "wrong-key"])
async def test_outsider_is_refused(outsider_key) -> None:
    with trio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            member, adm = await _host(stack, "member", KEY)
            outsider, _ = await _host(stack, "outsider", outsider_key)
            assert not await _echo_ok(outsider, member)
            assert not adm.is_admitted(outsider.peer_id)
            # A /shiza/ protocol is refused with a clear error frame, when the connection lasts.
            try:
                await outsider.connect(member.addrs[0])
                stream = await outsider.open_stream(member.peer_id, SHIZA_ECHO)
                reply = await recv_message(stream, 15)
                assert isinstance(reply, Error) and reply.code == 28 and "swarm" in reply.message
            except (StreamBroken, Exception) as exc:  # noqa: BLE001 - or the connection was cut
                assert not isinstance(exc, AssertionError), exc


async def test_member_does_not_serve_an_outsider_it_dials() -> None:
    with trio.fail_after(TIMEOUT):
        async with AsyncExitStack() as stack:
            member, _ = await _host(stack, "member2", KEY)
            outsider, _ = await _host(stack, "outsider2", None)
            # The member dials; the outsider still cannot use the member's protocols.
            await member.connect(outsider.addrs[0])
            stream_ok = True
            try:
                stream = await outsider.open_stream(member.peer_id, ECHO)
                await stream.send_frame(b"hi")
                stream_ok = await stream.read_frame(1024) == b"hi"
            except Exception:  # noqa: BLE001 - refused or disconnected
                stream_ok = False
            assert not stream_ok


def test_key_files(tmp_path) -> None:
    path = tmp_path / "swarm.key"
    key = write_swarm_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert SwarmKey.load(path).swarm_id == key.swarm_id and key.swarm_id.startswith("private-")
    with pytest.raises(FileExistsError):
        write_swarm_key(path)
    bare = tmp_path / "bare.key"
    bare.write_text("ab" * 32 + "\n")
    os.chmod(bare, 0o600)
    assert SwarmKey.load(bare).swarm_id == SwarmKey(bytes([0xAB]) * 32).swarm_id
    os.chmod(bare, 0o644)
    with pytest.raises(SwarmKeyError, match="chmod"):
        SwarmKey.load(bare)
    short = tmp_path / "short.key"
    short.write_text("abcd\n")
    os.chmod(short, 0o600)
    with pytest.raises(SwarmKeyError):
        SwarmKey.load(short)
