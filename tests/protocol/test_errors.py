from __future__ import annotations

import protocol
from protocol import ShizaError, error_from_code
from protocol.errors import ERROR_CLASSES

EXPECTED = {
    "MalformedFrame": 1, "FrameTooLarge": 2, "UnsupportedVersion": 3, "UnknownMessageType": 4,
    "LimitExceeded": 5, "InvalidMessage": 6, "InvalidSignature": 10, "KeyMismatch": 11,
    "RecordExpired": 12, "StaleSequence": 13, "ReceiptMismatch": 14, "DuplicateReceipt": 15,
    "BadProof": 16, "UnknownModel": 20, "SpanNotServed": 21,
    "BadShape": 22, "SessionNotFound": 23, "SessionClosed": 24, "Busy": 25, "Timeout": 26,
    "RateLimited": 27, "NotAllowed": 28,
    "Internal": 99,
}


def test_wire_codes_are_stable() -> None:
    assert {cls.__name__: code for code, cls in ERROR_CLASSES.items()} == EXPECTED
    for name, code in EXPECTED.items():
        cls = getattr(protocol, name)
        assert cls.code == code and issubclass(cls, ShizaError)
        exc = error_from_code(code, "why")
        assert type(exc) is cls and exc.message == "why" and str(exc) == "why"
    assert len({cls.name for cls in ERROR_CLASSES.values()}) == len(ERROR_CLASSES)


def test_unknown_code() -> None:
    exc = error_from_code(1234, "later version")
    assert type(exc) is ShizaError and exc.code == 1234
    assert ShizaError.code == 0  # the class default is untouched


def test_categories() -> None:
    assert issubclass(protocol.LimitExceeded, protocol.WireError)
    assert issubclass(protocol.KeyMismatch, protocol.TrustError)
    assert issubclass(protocol.Busy, protocol.ServiceError)
    assert "code=25" in repr(protocol.Busy("full"))
