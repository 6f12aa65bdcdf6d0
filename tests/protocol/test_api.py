from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import protocol

ROOT = Path(__file__).resolve().parents[2]

PUBLIC = {
    "PROTOCOL_VERSION", "INFO_PROTOCOL", "INFERENCE_PROTOCOL", "CAPACITY_NAMESPACE", "capacity_key",
    "model_provider_key", "ADMIT_PROTOCOL", "DISPUTE_NAMESPACE", "dispute_key", "dispute_provider_key", "PURPOSE_CAPACITY_RECORD", "PURPOSE_RECEIPT", "PURPOSE_RECEIPT_COUNTERSIGN",
    "PURPOSE_STATEMENT", "MAX_FRAME_BYTES", "MAX_NESTING", "MAX_STR_LEN", "MAX_LIST_LEN", "MAX_MAP_LEN",
    "MAX_TENSOR_ELEMENTS", "MAX_TENSOR_DIMS", "RECORD_MAX_TTL_S", "MAX_ADDRS", "MAX_SPANS",
    "ShizaError", "WireError", "TrustError", "ServiceError", "MalformedFrame", "FrameTooLarge",
    "UnsupportedVersion", "UnknownMessageType", "LimitExceeded", "InvalidMessage", "InvalidSignature",
    "KeyMismatch", "RecordExpired", "StaleSequence", "UnknownModel", "SpanNotServed", "BadShape",
    "SessionNotFound", "SessionClosed", "Busy", "Timeout", "RateLimited", "NotAllowed", "Internal", "error_from_code",
    "encode_frame", "FrameDecoder", "pack", "unpack", "canonical_pack", "Tensor", "itemsize", "DTYPES",
    "FLOAT_DTYPES", "Message", "InfoRequest", "NodeInfo", "ServedSpan", "SamplingParams", "OpenSession",
    "SessionOpened", "Step", "StepResult", "CloseSession", "Closed", "Error", "SessionState", "NODE_STATES",
    "encode_message", "decode_message", "message_to_wire", "Identity", "IdentityFileError", "verify",
    "peer_id_from_public_key", "public_key_from_peer_id", "CapacityRecord", "Gpu", "Hardware", "sign_record",
    "verify_record", "SequenceTracker", "model_id", "parse_model_id",
    # receipts and settlement
    "PURPOSE_STATEMENT_COUNTERSIGN", "PURPOSE_IO_DIGEST", "PURPOSE_RECEIPT_ID", "DEFAULT_SWARM_ID",
    "MAX_RECEIPTS_PER_DOCUMENT", "ReceiptMismatch", "DuplicateReceipt", "BadProof", "Countersign", "Dispute",
    "Receipt", "receipt_id_for", "sign_receipt", "countersign_receipt", "verify_receipt", "check_receipt",
    "IoDigest", "count_step_tokens", "latest_per_session", "Statement", "settleable", "build_statement",
    "cosign_statement", "verify_statement", "receipt_leaf", "merkle_root", "merkle_proof", "verify_proof",
    "encode_document", "decode_document", "verify_documents", "VerifyReport",
    # disputes
    "PURPOSE_DISPUTE", "DisputeRecord", "output_digest", "sign_dispute", "verify_dispute",
    "check_dispute", "MAX_DISPUTE_AGE_S", "MAX_DISPUTE_SKEW_S",
}


def test_exported_names_are_pinned() -> None:
    assert set(protocol.__all__) == PUBLIC
    assert len(protocol.__all__) == len(PUBLIC)
    for name in PUBLIC:
        assert hasattr(protocol, name)


def test_constants() -> None:
    assert protocol.PROTOCOL_VERSION == 0
    assert protocol.INFO_PROTOCOL == "/shiza/info/0.1.0"
    assert protocol.INFERENCE_PROTOCOL == "/shiza/inference/0.1.0"
    assert protocol.MAX_FRAME_BYTES == 64 * 2**20
    assert (protocol.MAX_NESTING, protocol.MAX_STR_LEN, protocol.MAX_LIST_LEN, protocol.MAX_MAP_LEN) == (16, 65536, 65536, 256)
    assert (protocol.MAX_TENSOR_ELEMENTS, protocol.MAX_TENSOR_DIMS) == (16 * 2**20, 4)
    assert (protocol.RECORD_MAX_TTL_S, protocol.MAX_ADDRS, protocol.MAX_SPANS) == (3600, 16, 64)
    assert [s.value for s in protocol.SessionState] == ["opening", "open", "closed", "failed"]


def test_import_pulls_in_no_heavy_or_async_dependency() -> None:
    code = (
        "import protocol, sys; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trio', 'libp2p', 'numpy', 'node', 'multiaddr')); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_modules_stay_small() -> None:
    for path in (ROOT / "protocol").glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name


def test_protocol_imports_only_allowed_modules() -> None:
    import ast

    allowed_third_party = {"msgpack", "nacl"}
    stdlib = set(sys.stdlib_module_names)
    for path in (ROOT / "protocol").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in allowed_third_party or top == "__future__", f"{path.name} imports {name}"
