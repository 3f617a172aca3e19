"""Shared fixtures: a tiny random open_clip model in a local checkpoint, images on disk."""

import json
from pathlib import Path

import numpy as np
import pytest

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                   "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(model_name, checkpoint path) of a tiny randomly initialised CLIP saved locally."""
    open_clip = pytest.importorskip("open_clip")
    import torch

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / "skmml-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("skmml-tiny-clip", pretrained=None)
    checkpoint = folder / "tiny_clip.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return "skmml-tiny-clip", str(checkpoint)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """root/<class>/*.png (3 classes x 4 greyscale PNGs) and root/<class>.txt documents."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square", "stripe"]):
        (root / name).mkdir()
        for i in range(4):
            pixels = (rng.integers(0, 60, (20, 24)) + 60 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
        (root / f"{name}.txt").write_text(
            f"A {name} is a shape. It is drawn often!\n== References ==\nBook (1999).\n"
        )
    (root / "notes.md").write_text("not an image")
    return root


def _wait_healthy(server, timeout):
    """Wait for the server's health endpoint; fail fast if the process exits."""
    import time
    import urllib.request

    url = f"http://127.0.0.1:{server.webservice_port}/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.server_proc.poll() is not None:
            log = Path(server.config.base_data_dir, "logs", "milvus-stdout.log")
            errors = [line for line in log.read_text(errors="replace").splitlines()
                      if "[ERROR]" in line or "[FATAL]" in line]
            raise RuntimeError(f"the server exited: {(errors or ['no error logged'])[-1][:300]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if b"OK" in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"not healthy after {timeout} s")


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """(uri, token) of the real Milvus 2.3.5 standalone server, started for this session.

    PyPI's ``milvus`` package bundles the server with embedded etcd. Its
    advertised addresses and etcd are bound to 127.0.0.1, authentication is
    on (user root), and it stops when the session ends. The tests that need
    it are skipped, with the reason, only when it cannot start here.
    """
    pytest.importorskip("pymilvus")
    try:
        from milvus import MilvusServer, MilvusServerConfig
    except ImportError as exc:
        pytest.skip(f"the real Milvus server is not installed (pip install milvus==2.3.5): {exc}")
    config = MilvusServerConfig(data_dir=str(tmp_path_factory.mktemp("milvus_server")))
    for component in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode",
                      "dataCoord", "dataNode"):
        config.set(f"{component}.ip", "127.0.0.1")
    config.set("authorization_enabled", True)
    server = MilvusServer(config, wait_for_started=False)
    try:
        server.start()
        _wait_healthy(server, timeout=90)
    except Exception as exc:  # e.g. the binary does not run here, or a port is taken
        server.stop()
        pytest.skip(f"the real Milvus server could not start: {exc}")
    try:
        yield f"http://127.0.0.1:{server.listen_port}", "root:Milvus"
    finally:
        server.stop()
