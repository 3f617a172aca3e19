"""The real Milvus standalone server on this machine, reachable only through loopback.

Used by the test suite and ``benchmarks/bench_scale.py``. PyPI's ``milvus``
package (2.3.5) bundles the server with embedded etcd. Its config binds the
advertised addresses and etcd to an address of our choice, but the binary's
gRPC and metrics listeners bind every interface, and no setting changes that.
So, where the process may create a network namespace (Linux, as root or with
CAP_SYS_ADMIN), the server runs in a fresh one that holds nothing but its
own loopback device: no other host can reach any of its ports. A forwarder
thread in this process listens on 127.0.0.1 and relays each connection into
the namespace's 127.0.0.1, so clients connect to ``http://127.0.0.1:PORT`` as
usual and every byte stays on loopback. Where namespaces are not allowed the
server starts in the host's namespace, with its listeners on all interfaces,
and :attr:`LocalMilvusServer.isolated` says so.
"""

import ctypes
import fcntl
import os
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord",
               "dataNode")


def _enter_new_network_namespace():
    """Move the calling thread into a new network namespace with loopback up.

    Only this thread moves (Linux namespaces are per thread); processes it
    starts inherit the namespace, and the sockets it creates live there.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, _SIOCGIFFLAGS,
                                                  struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))


def _pump(source, sink):
    """Copy bytes from `source` to `sink` until either side closes."""
    try:
        while data := source.recv(1 << 18):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (sink, source):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Namespace(threading.Thread):
    """A thread living in a private network namespace, which runs calls there.

    :meth:`run_here` runs a function on this thread (e.g. starting the
    server); :meth:`forward` relays a host loopback port to a port of the
    namespace's loopback.
    """

    def __init__(self):
        super().__init__(daemon=True, name="skmml-milvus-netns")
        self._calls, self._ready = [], threading.Condition()
        self._error = None
        self._listeners = []

    def run(self):
        try:
            _enter_new_network_namespace()
        except OSError as exc:
            self._error = exc
        with self._ready:
            self._ready.notify_all()
            while True:
                while not self._calls:
                    self._ready.wait()
                fn, box = self._calls.pop(0)
                if fn is None:
                    return
                try:
                    box["value"] = fn()
                except BaseException as exc:  # handed back to the caller
                    box["error"] = exc
                box["done"] = True
                self._ready.notify_all()

    def start_and_check(self):
        """Start the thread; raise OSError if it cannot get a namespace."""
        with self._ready:
            self.start()
            self._ready.wait()
        if self._error is not None:
            self.join()
            raise self._error

    def run_here(self, fn):
        """Run `fn()` in the namespace and return its result (or raise its error)."""
        box = {}
        with self._ready:
            self._calls.append((fn, box))
            self._ready.notify_all()
            while "done" not in box:
                self._ready.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def forward(self, port):
        """Listen on the host's 127.0.0.1 and relay each connection to `port` in here.

        Returns the host port. The listening socket is created by the caller
        (in the host's namespace); each outgoing one by an acceptor thread
        started from this namespace thread, so it lives in the namespace.
        """
        listener = socket.create_server(("127.0.0.1", 0))
        self._listeners.append(listener)

        def accept_loop():
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:  # closed by stop()
                    return
                try:
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                for s in (client, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=_pump, args=(a, b), daemon=True).start()

        # A thread created by the namespace thread inherits its namespace.
        self.run_here(lambda: threading.Thread(target=accept_loop, daemon=True,
                                               name=f"skmml-milvus-forward-{port}").start())
        return listener.getsockname()[1]

    def stop(self):
        for listener in self._listeners:
            listener.close()
        with self._ready:
            self._calls.append((None, None))
            self._ready.notify_all()
        self.join(timeout=5)


class LocalMilvusServer:
    """A Milvus 2.3.5 standalone server for this machine's own use (tests, benchmarks).

    Parameters
    ----------
    data_dir : str
        Folder for the server's data, config and logs.
    authorization : bool, default=False
        Turn authentication on (user ``root``, password ``Milvus``).

    Attributes
    ----------
    uri : str
        ``http://127.0.0.1:PORT``, the address clients use.
    token : str or None
        ``"root:Milvus"`` with authorization, else None.
    isolated : bool
        True when the server runs in its own network namespace (no port of
        it reachable from another host); False when it had to start in the
        host's namespace, where its gRPC and metrics ports listen on all
        interfaces.
    pid : int
        The server process.
    """

    def __init__(self, data_dir, authorization=False):
        from milvus import MilvusServer, MilvusServerConfig

        config = MilvusServerConfig(data_dir=str(data_dir))
        for component in _COMPONENTS:
            config.set(f"{component}.ip", "127.0.0.1")
        if authorization:
            config.set("authorization_enabled", True)
        self.token = "root:Milvus" if authorization else None
        self._server = MilvusServer(config, wait_for_started=False)
        self._namespace = _Namespace()
        try:
            self._namespace.start_and_check()
            self.isolated = True
        except OSError as exc:
            self.isolated, self.why_not_isolated = False, str(exc)

    def start(self, timeout=90):
        """Start the server and wait until it answers its health check."""
        if self.isolated:
            self._namespace.run_here(self._server.start)
            port = self._namespace.forward(self._server.listen_port)
            health_port = self._namespace.forward(self._server.webservice_port)
        else:
            self._server.start()
            port, health_port = self._server.listen_port, self._server.webservice_port
        self.uri = f"http://127.0.0.1:{port}"
        self.pid = self._server.server_proc.pid
        try:
            self._wait_healthy(health_port, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, port, timeout):
        """Poll the health endpoint; fail fast, with the server's last error, if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._server.server_proc.poll() is not None:
                log = Path(self._server.config.base_data_dir, "logs", "milvus-stdout.log")
                errors = [line for line in log.read_text(errors="replace").splitlines()
                          if "[ERROR]" in line or "[FATAL]" in line]
                raise RuntimeError(
                    f"the server exited: {(errors or ['no error logged'])[-1][:300]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                            timeout=2) as response:
                    if b"OK" in response.read():
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not healthy after {timeout} s")

    def stop(self):
        """Stop the server and the forwarder."""
        self._server.stop()
        if self.isolated:
            self._namespace.stop()
