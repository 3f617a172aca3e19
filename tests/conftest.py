"""Shared fixtures: a tiny random open_clip model in a local checkpoint, images on disk."""

import json
import os
import tempfile
import warnings

import numpy as np
import pytest

# Certified search caches its measured choices here, not in the user's home.
os.environ.setdefault("SKMML_CACHE_DIR", tempfile.mkdtemp(prefix="skmml-test-cache-"))

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


@pytest.fixture
def read_while_writing():
    """run(read, write, steps): `read()` in two threads while `write(step)` runs each step.

    Returns what the reads returned that was not None: the inconsistent reads.
    """
    return _read_while_writing


def _read_while_writing(read, write, steps, n_readers=2):
    import threading

    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            result = read()
            if result is not None:
                bad.append(result)

    threads = [threading.Thread(target=reader) for _ in range(n_readers)]
    for t in threads:
        t.start()
    try:
        for step in range(steps):
            write(step)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return bad


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


@pytest.fixture(scope="session")
def milvus_local_server(tmp_path_factory):
    """The real Milvus 2.3.5 standalone server, started for this session.

    PyPI's ``milvus`` package bundles the server with embedded etcd. It runs
    in a network namespace of its own where the machine allows one, so that
    only this machine's loopback reaches it (``tests/_local_milvus.py``);
    authentication is on (user root), and it stops when the session ends.
    The tests that need it are skipped, with the reason, only when it cannot
    start here.
    """
    pytest.importorskip("pymilvus")
    from _local_milvus import LocalMilvusServer

    try:
        import milvus  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the real Milvus server is not installed (pip install milvus==2.3.5): {exc}")
    server = LocalMilvusServer(tmp_path_factory.mktemp("milvus_server"), authorization=True)
    if not server.isolated:
        warnings.warn("the Milvus server runs in the host's network namespace (its gRPC "
                      "ports listen on all interfaces): no network namespace here: "
                      f"{server.why_not_isolated}")
    try:
        server.start()
    except Exception as exc:  # e.g. the binary does not run here, or a port is taken
        pytest.skip(f"the real Milvus server could not start: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def milvus_server(milvus_local_server):
    """(uri, token) of :func:`milvus_local_server`."""
    return milvus_local_server.uri, milvus_local_server.token
