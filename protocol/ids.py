"""Names and numbers of the shiza protocol, version 0: protocol ids, DHT keys, signing
purposes and every limit. SPEC.md states the same values; a change here is a protocol change.
"""

from __future__ import annotations

import hashlib
from typing import Final

#: The integer "v" field of every message and record.
PROTOCOL_VERSION: Final = 0

# libp2p stream protocol ids.
INFO_PROTOCOL: Final = "/shiza/info/0.1.0"
INFERENCE_PROTOCOL: Final = "/shiza/inference/0.1.0"
ADMIT_PROTOCOL: Final = "/shiza/admit/0.1.0"  # private swarms (SPEC.md, section 18)
LINK_PROTOCOL: Final = "/shiza/link/0.1.0"  # node-to-node activations (SPEC.md, section 9.6)

# DHT keys.
CAPACITY_NAMESPACE: Final = "shiza-cap"
_MODEL_PROVIDER_DOMAIN: Final = b"shiza/model/"


def capacity_key(peer_id: str) -> str:
    """The DHT value key under which ``peer_id`` publishes its signed capacity record."""
    return f"/{CAPACITY_NAMESPACE}/{peer_id}"


def model_provider_key(model_id: str) -> bytes:
    """The DHT provider key (32 bytes) announced by every node serving a span of ``model_id``."""
    return hashlib.sha256(_MODEL_PROVIDER_DOMAIN + model_id.encode("utf-8")).digest()


DISPUTE_NAMESPACE: Final = "shiza-dispute"
_DISPUTE_PROVIDER_DOMAIN: Final = b"shiza/disputes/"


def dispute_key(accused: str, reporter: str) -> str:
    """The DHT value key of ``reporter``'s dispute against ``accused`` (one slot per pair)."""
    return f"/{DISPUTE_NAMESPACE}/{accused}/{reporter}"


def dispute_provider_key(accused: str) -> bytes:
    """The DHT provider key (32 bytes) announced by every reporter of a dispute against ``accused``."""
    return hashlib.sha256(_DISPUTE_PROVIDER_DOMAIN + accused.encode("utf-8")).digest()


# Signing purposes: prepended to the signed bytes so that a signature made for one kind of
# message can never be replayed as another. Each ends in NUL and holds no other NUL, so no
# purpose is a prefix of another.
PURPOSE_CAPACITY_RECORD: Final = b"shiza/capacity-record/v0\x00"
PURPOSE_RECEIPT: Final = b"shiza/receipt/v0\x00"
PURPOSE_RECEIPT_COUNTERSIGN: Final = b"shiza/receipt-countersign/v0\x00"
PURPOSE_STATEMENT: Final = b"shiza/statement/v0\x00"
PURPOSE_STATEMENT_COUNTERSIGN: Final = b"shiza/statement-countersign/v0\x00"
PURPOSE_PUSH: Final = b"shiza/push/v0\x00"  # a hop's word on what it pushed to the next (9.6)
PURPOSES: Final = (
    PURPOSE_CAPACITY_RECORD,
    PURPOSE_RECEIPT,
    PURPOSE_RECEIPT_COUNTERSIGN,
    PURPOSE_STATEMENT,
    PURPOSE_STATEMENT_COUNTERSIGN,
    PURPOSE_PUSH,
)

# Hash domains (never signed directly): the running digest of a session's inputs and outputs,
# and the derivation of receipt ids.
PURPOSE_IO_DIGEST: Final = b"shiza/io-digest/v0\x00"
PURPOSE_RECEIPT_ID: Final = b"shiza/receipt-id/v0\x00"

# Framing and msgpack limits.
FRAME_HEADER_BYTES: Final = 4
MAX_FRAME_BYTES: Final = 64 * 2**20  # payload bytes of one frame, header excluded
MAX_NESTING: Final = 16  # containers (maps, arrays) nested in one another; top-level map = 1
MAX_STR_LEN: Final = 64 * 2**10  # bytes of UTF-8 in one msgpack str
MAX_LIST_LEN: Final = 65536  # elements of one msgpack array
MAX_MAP_LEN: Final = 256  # entries of one msgpack map
# Objects decoded from one frame: every array and map, plus their elements (map entries count
# two). Bounds the memory a frame costs (a Python object is ~30-60 bytes, where its msgpack
# encoding can be one byte); no message of this protocol needs more than a few hundred.
MAX_DECODED_OBJECTS: Final = 2 * MAX_LIST_LEN + 1024
# A serving node reads every frame but a session's Steps under this bound (info_req, open,
# close, cosign, dispute); a Step frame is bounded by what its session opened (SPEC.md 9.2).
MAX_CONTROL_FRAME_BYTES: Final = 64 * 2**10
# Frames larger than this are decoded in a worker thread, off the event loop.
DECODE_IN_THREAD_BYTES: Final = 1 * 2**20

# Tensors.
MAX_TENSOR_ELEMENTS: Final = 16 * 2**20
MAX_TENSOR_DIMS: Final = 4

# Message fields.
MAX_ID_LEN: Final = 256  # peer ids, model ids, session ids, version strings (UTF-8 bytes)
MAX_ADDR_LEN: Final = 1024  # one multiaddr, as text
MAX_ADDRS: Final = 16
MAX_SPANS: Final = 64
MAX_LAYERS: Final = 65536  # bound on num_layers, start, end
MAX_BATCH_SIZE: Final = 1024
MAX_SESSION_LENGTH: Final = 2**20  # tokens of one session (max_length)
MAX_ERROR_MESSAGE_LEN: Final = 4096  # characters; longer messages are truncated by senders
MAX_RETRY_AFTER_S: Final = 3600.0  # Error.retry_after_s: the longest retry hint a frame may carry
MAX_UINT64: Final = 2**64 - 1
MAX_TEMPERATURE: Final = 10.0
MAX_TOKEN_ID: Final = 2**31 - 1  # a token id in a message's int fields (grammar_prefix)
# SamplingParams.grammar (7.1): the llguidance grammar of a constrained session, UTF-8 bytes.
MAX_GRAMMAR_BYTES: Final = 32 * 2**10
MAX_LOGIT_BIAS: Final = 300  # SamplingParams.logit_bias entries (OpenAI's bound)
MAX_TOP_LOGPROBS: Final = 20  # SamplingParams.logprobs: the most likely tokens reported per position

# Capacity records.
RECORD_MAX_TTL_S: Final = 3600
MAX_CLOCK_SKEW_S: Final = 300
MAX_RECORD_BYTES: Final = 64 * 2**10

# Receipts and settlement.
DEFAULT_SWARM_ID: Final = "public"
RECEIPT_ID_LEN: Final = 32  # lowercase hex characters
IO_DIGEST_BYTES: Final = 32
MAX_RECEIPT_BYTES: Final = 4096  # one receipt in canonical msgpack
MAX_STATEMENT_BYTES: Final = 4096  # one statement in canonical msgpack
MAX_RECEIPTS_PER_DOCUMENT: Final = 1_000_000
MAX_DOCUMENT_BYTES: Final = 2**30  # one export, statement or receipt document (JSON or msgpack)
