"""What a failed ``shiza`` command prints and exits with: one line on stderr, a documented code.

Every exception that reaches the command line (through trio's exception groups, unwrapped here)
is explained as ``error: <what happened and what to do>`` with one of the exit codes below; the
traceback goes to the log only at ``-vv`` (debug). Anything not recognised is a bug: it says so,
names the exception, and asks for ``-vv``.

Exit codes (README, "Command line"):

    0    success
    1    internal error (a bug; rerun with -vv for the traceback)
    2    usage or configuration: a bad flag value, an unknown model, a bad span, an unreadable
         or unusable file (key, config, checkpoint)
    3    network: no route through the swarm, bootstrap peers unreachable
    4    a peer refused or failed the request
    5    local storage: a corrupt ledger or cache, disk full, permission denied on the data dir
    6    address in use: a listening port is taken
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import errno
import logging

__all__ = ["EXIT_CODES", "explain", "leaf"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NETWORK = 3
EXIT_PEER = 4
EXIT_STORAGE = 5
EXIT_ADDRESS_IN_USE = 6
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug; rerun with -vv for the traceback)",
    EXIT_USAGE: "usage or configuration error (bad flag, unknown model, bad span, unusable file)",
    EXIT_NETWORK: "network: no route through the swarm, or bootstrap peers unreachable",
    EXIT_PEER: "a peer refused or failed the request",
    EXIT_STORAGE: "local storage: corrupt ledger or cache, disk full, permission denied",
    EXIT_ADDRESS_IN_USE: "a listening address or port is already in use",
    EXIT_INTERRUPTED: "interrupted",
}

log = logging.getLogger("shiza")


def leaf(exc: BaseException) -> BaseException:
    """The exception that matters inside (nested) exception groups: the first leaf that is not
    a cancellation or an interrupt's echo; ``exc`` itself when it is no group."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not _is_cancel(e)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _is_cancel(exc: BaseException) -> bool:
    try:
        import trio
    except ImportError:  # pragma: no cover - trio is a base dependency
        return False
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancel(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def explain(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line without the ``error:`` prefix) for an exception a command raised."""
    exc = leaf(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    from node.client.errors import ClientError, InvalidRequest, NoRoute
    from node.engine.errors import EngineError
    from node.ledger.errors import LedgerError
    from node.models.errors import ModelError
    from protocol.errors import ShizaError

    text = _one_line(exc)
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        return _os_error(exc, text)
    if isinstance(exc, LedgerError):
        return EXIT_STORAGE, text
    if isinstance(exc, NoRoute):
        return EXIT_NETWORK, text
    if isinstance(exc, InvalidRequest):
        return EXIT_USAGE, text
    if isinstance(exc, (ClientError, ShizaError)):
        return EXIT_PEER, text
    if isinstance(exc, ConnectionError):
        return EXIT_NETWORK, f"cannot connect: {text}"
    if isinstance(exc, (ModelError, EngineError, ValueError)):
        return EXIT_USAGE, text
    return EXIT_INTERNAL, (f"internal error: {type(exc).__name__}: {text} "
                           "(a bug: rerun with -vv for the traceback and report it)")


def _os_error(exc: OSError, text: str) -> tuple[int, str]:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    reason = exc.strerror or text
    if exc.errno == errno.EADDRINUSE:
        return EXIT_ADDRESS_IN_USE, (f"address already in use{where}: {reason}; choose another port "
                                     "or stop what listens there")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_STORAGE, f"disk full{where}: free some space (or point --data-dir elsewhere) and retry"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EXIT_STORAGE, f"permission denied{where}: {reason}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        return EXIT_USAGE, f"no such file{where}: {reason}"
    return EXIT_STORAGE, f"{reason}{where}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."
