"""Connections to Milvus: clients, Milvus Lite's one process per file, errors that say why."""

import functools
import logging
import os
import threading
import time

#: Where the token comes from when the ``token`` parameter is not given.
TOKEN_ENV = "MILVUS_TOKEN"


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise ImportError(
            'MilvusMemory needs pymilvus and milvus-lite: pip install "skmml[milvus]"'
        ) from None
    _quiet_benign_logs()
    return pymilvus


class _DropMessages(logging.Filter):
    def __init__(self, *starts):
        super().__init__()
        self.starts = starts

    def filter(self, record):
        return not record.getMessage().startswith(self.starts)


@functools.cache
def _quiet_benign_logs():
    """Silence two messages Milvus Lite causes on every streamed read, which are harmless.

    Lite's in-process server does not implement the timestamp call that
    pymilvus's query iterator makes first; pymilvus then falls back to a
    client-side timestamp (correct here: Lite reads its own writes).
    """
    logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(
        _DropMessages("failed to get mvccTs"))
    logging.getLogger("grpc._server").addFilter(
        _DropMessages("Exception calling application: Method not implemented"))


#: Open skmml handles per Milvus Lite file in this process (see MilvusMemory.close),
#: keyed by the file's absolute path as resolved when the handle connected.
_LITE_HANDLES = {}
_LITE_GUARD = threading.Lock()


def _is_lite(uri):
    return uri.endswith(".db")


def _resolve(uri):
    """The URI a handle keeps: a Milvus Lite path made absolute (a later chdir changes nothing)."""
    uri = os.fspath(uri)
    return os.path.abspath(uri) if _is_lite(uri) else uri


def _connect(uri, token, timeout):
    """A client of `uri` (already resolved); its failure is told apart and explained."""
    pymilvus = _pymilvus()
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    started = time.monotonic()
    try:
        client = pymilvus.MilvusClient(uri, token=token, timeout=timeout)
    except (pymilvus.exceptions.MilvusException, grpc_error()) as exc:
        raise _connect_error(uri, exc, time.monotonic() - started, timeout) from None
    if _is_lite(uri):
        with _LITE_GUARD:
            _LITE_HANDLES[uri] = _LITE_HANDLES.get(uri, 0) + 1
    return client


def _disconnect(uri, client):
    """Close `client`; the last handle on a Lite file also stops its in-process engine.

    Milvus Lite keeps a file's engine (and its lock) for the life of the
    process; stopping it with the last handle lets another process open the
    file. Never raises: it runs from finalizers, also at interpreter exit.
    """
    try:
        client.close()
    except Exception:  # a dead server or a half-torn-down interpreter
        pass
    if not _is_lite(uri):
        return
    with _LITE_GUARD:
        left = _LITE_HANDLES.get(uri, 1) - 1
        if left > 0:
            _LITE_HANDLES[uri] = left
            return
        _LITE_HANDLES.pop(uri, None)
    # In a thread of its own: Lite's gRPC server waits for a request still running
    # (one its client gave up on at the timeout) before it stops, and this must not.
    stopper = threading.Thread(target=_release_lite, args=(uri,), daemon=True,
                               name="skmml-milvus-lite-release")
    stopper.start()
    stopper.join(timeout=5)


def _release_lite(uri):
    try:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)
    except Exception:
        pass


def add_note(exc, note):
    """Attach `note` to `exc` (``BaseException.add_note``; on Python 3.10, in its message)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    elif exc.args and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} [{note}]",) + exc.args[1:]


def grpc_error():
    """The exception class of failed gRPC calls (raised by pymilvus on deadlines)."""
    import grpc

    return grpc.RpcError


def _answers(uri):
    """Whether something accepts TCP connections at the server URL `uri`."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri if "://" in uri else f"http://{uri}")
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 19530), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _lite_locked(uri):
    """Whether another process holds the lock of the Milvus Lite file `uri`."""
    import fcntl

    lock = os.path.join(uri, "LOCK")
    if not os.path.exists(lock):
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _message(exc):
    return str(getattr(exc, "message", None) or (exc.details() if hasattr(exc, "details")
                                                  else exc))


def _connect_error(uri, exc, elapsed, timeout):
    """Why connecting to `uri` failed: busy Lite file, hung server, refused token, or no server.

    pymilvus reports all of them alike ("Fail connecting ... illegal
    connection params or server unavailable"); they differ in whether
    something accepts TCP connections and in how long the attempt took.
    """
    message = _message(exc)
    if _is_lite(uri):
        if _lite_locked(uri) or "lock" in message.lower():
            return ConnectionError(
                f"Cannot open Milvus Lite file {uri}: another process has this Milvus Lite "
                "file open; Lite serves one process per file. To share it, serve it: `milvus-lite server "
                f"--data-dir {uri} --host 127.0.0.1 --port 19530` and connect every process "
                f"with uri='http://127.0.0.1:19530'. ({message})")
        return ConnectionError(f"Cannot open Milvus Lite file {uri}: {message}")
    if not _answers(uri):
        return ConnectionError(f"Cannot connect to Milvus at {uri}: nothing accepts "
                               f"connections there (the server is down or unreachable).")
    if timeout is not None and elapsed >= 0.8 * timeout:
        return ConnectionError(
            f"Cannot connect to Milvus at {uri}: it accepts connections but did not answer "
            f"within the timeout ({timeout} s); the server is hung or overloaded.")
    return ValueError(
        f"Cannot connect to Milvus at {uri}: the server answers but refused the handshake: "
        f"the token is wrong or missing (the token parameter or ${TOKEN_ENV}), or this is "
        f"not a Milvus server. ({message})")


def _call_error(uri, collection, what, exc, timeout):
    """The error a failed call on `collection` raises: what failed, where, and why.

    The server's side (unreachable, hung, died mid-call, not serving the
    collection yet) is a ConnectionError; a collection that is gone is a
    ValueError; anything else the server refused is a RuntimeError.
    """
    pymilvus = _pymilvus()
    where = f"Milvus collection {collection!r} at {uri}"
    message = _message(exc)
    code = exc.code() if callable(getattr(exc, "code", None)) else getattr(exc, "code", None)
    name = getattr(code, "name", "")
    lowered = message.lower()
    if name == "DEADLINE_EXCEEDED" or "retry timeout" in lowered or "deadline" in lowered:
        return ConnectionError(f"{what} on {where} did not finish within the timeout "
                               f"({timeout} s): the server is hung, overloaded, or (just restarted) still "
                               "loading the collection.")
    if isinstance(exc, grpc_error()) or name in ("UNAVAILABLE", "CANCELLED") or isinstance(
            exc, (pymilvus.exceptions.MilvusUnavailableException,
                  pymilvus.exceptions.ConnectError)) or code in (2, 503) or \
            "fail connecting" in lowered or "unavailable" in lowered:
        return ConnectionError(f"{what} on {where} failed: lost the server ({message}).")
    if isinstance(exc, pymilvus.exceptions.CollectionNotExistException) or \
            "collection not found" in lowered or "can't find collection" in lowered:
        return ValueError(f"{where} does not exist (dropped?): {message}")
    return RuntimeError(f"{what} failed on {where}: {message}")
