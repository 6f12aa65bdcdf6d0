"""Shared builders for protocol tests."""

from __future__ import annotations

import pytest

from protocol import CapacityRecord, Hardware, Identity, ServedSpan, sign_record

MODEL = "SmolLM2-135M-Instruct@0123456789abcdef"
NOW = 1_700_000_000.0


def make_record(identity: Identity, **overrides: object) -> CapacityRecord:
    fields: dict[str, object] = dict(
        peer_id=identity.peer_id,
        addrs=("/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4001"),
        spans=(ServedSpan(MODEL, 0, 10, 30), ServedSpan(MODEL, 20, 30, 30)),
        hardware=Hardware("cuda", "NVIDIA H100 80GB HBM3", 80 * 2**30, 70 * 2**30),
        throughput=123.5,
        cache_tokens_left=65536,
        state="online",
        seq=7,
        issued_at=NOW,
        expires_at=NOW + 600,
    )
    fields.update(overrides)
    return CapacityRecord(**fields)  # type: ignore[arg-type]


@pytest.fixture
def identity() -> Identity:
    return Identity.from_seed(bytes(range(32)))


@pytest.fixture
def signed(identity: Identity) -> CapacityRecord:
    return sign_record(identity, make_record(identity))
