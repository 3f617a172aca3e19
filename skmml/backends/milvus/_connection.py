"""Connections to Milvus: clients, Milvus Lite's one process per file, errors that say why."""

import functools
import logging
import os
import threading

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


#: Open skmml handles per Milvus Lite path in this process (see MilvusMemory.close).
_LITE_HANDLES = {}
_LITE_GUARD = threading.Lock()


def _is_lite(uri):
    return uri.endswith(".db")


def _connect(uri, token, timeout):
    pymilvus = _pymilvus()
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    try:
        client = pymilvus.MilvusClient(uri, token=token, timeout=timeout)
    except pymilvus.exceptions.MilvusException as exc:
        raise _connection_error(uri, None, exc) from None
    if _is_lite(uri):
        with _LITE_GUARD:
            key = os.path.abspath(uri)
            _LITE_HANDLES[key] = _LITE_HANDLES.get(key, 0) + 1
    return client


def _disconnect(uri, client):
    """Close `client`; the last handle on a Lite file also stops its in-process engine.

    Milvus Lite keeps a file's engine (and its lock) for the life of the
    process; stopping it with the last handle lets another process open the
    file.
    """
    client.close()
    if not _is_lite(uri):
        return
    key = os.path.abspath(uri)
    with _LITE_GUARD:
        _LITE_HANDLES[key] -= 1
        last = not _LITE_HANDLES[key]
        if last:
            del _LITE_HANDLES[key]
    if last:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(key)


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


def _connection_error(uri, collection, exc):
    """A ConnectionError naming the URI, with what to do about it."""
    message = str(getattr(exc, "message", exc))
    where = f"Milvus at {uri}" if collection is None else \
        f"Milvus collection {collection!r} at {uri}"
    if _is_lite(uri) and (_lite_locked(uri) or "lock" in message.lower()):
        hint = ("another process has this Milvus Lite file open; Lite serves one process per "
                "file. To share it, serve it: `milvus-lite server --data-dir "
                f"{uri} --host 127.0.0.1 --port 19530` and connect every process with "
                "uri='http://127.0.0.1:19530'.")
    elif _answers(uri):
        # The server is up but refused the handshake: pymilvus reports a
        # wrong or missing token like an unreachable server.
        hint = (f"authentication failed (the server answers but refused the connection): "
                f"check the token (the token parameter or ${TOKEN_ENV}).")
    else:
        hint = "the server is unreachable."
    return ConnectionError(f"Cannot use {where}: {hint} ({message})")
