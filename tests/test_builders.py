from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import FunctionTransformer

from skmml import Memory, build_memory


def _flatten(images):
    return np.stack([np.asarray(i, dtype=np.float32).ravel() for i in images])


def _letters(texts):
    return np.array([[t.count(c) + 0.5 for c in "abcdefghijklmnopqrstuvwxy"] for t in texts])


IMAGE = FunctionTransformer(_flatten)
TEXT = FunctionTransformer(_letters)


def test_build_memory_from_dicts():
    rng = np.random.default_rng(0)
    images = {"a": list(rng.integers(0, 255, (3, 5, 5), dtype=np.uint8)),
              "b": rng.integers(0, 255, (2, 5, 5), dtype=np.uint8)}
    texts = {"a": ["an apple.", "a bee."],
             "b": "Bees buzz. They make honey.\n== References ==\nA book."}
    memory = build_memory(images, texts, image_encoder=IMAGE, text_encoder=TEXT)
    assert list(memory.image.labels) == ["a"] * 3 + ["b"] * 2
    assert list(memory.text.labels) == ["a", "a", "b", "b"]
    assert list(memory.text.metadata["text"]) == ["an apple.", "a bee.", "Bees buzz.",
                                                  "They make honey."]
    assert memory.image.metadata["source"].isna().all()
    expected = _flatten(images["a"] + list(images["b"]))
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(memory.image.embeddings, expected, rtol=1e-6)


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "needs images, texts or both"),
    ({"images": {"a": [np.zeros((2, 2))]}}, ValueError, "without an image_encoder"),
    ({"texts": {"a": ["x"]}}, ValueError, "without a text_encoder"),
    ({"images": [np.zeros((2, 2))], "image_encoder": IMAGE}, TypeError, "dict of class"),
    ({"images": {"a": []}, "image_encoder": IMAGE}, ValueError, r"images\['a'\] is empty"),
])
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        build_memory(**kwargs)


def test_failing_encoder_builds_nothing():
    def fail(texts):
        raise ValueError("Text 1 is broken")

    with pytest.raises(ValueError, match="Text 1 is broken"):
        build_memory({"a": [np.ones((2, 2))]}, {"a": ["x", "y"]}, image_encoder=IMAGE,
                     text_encoder=FunctionTransformer(fail))


def test_from_folder_with_clip(image_folder, tiny_clip, tmp_path):
    from skmml import CLIPImageEncoder, CLIPTextEncoder

    name, checkpoint = tiny_clip
    image_encoder = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu")
    text_encoder = CLIPTextEncoder(name, pretrained=checkpoint, device="cpu")
    memory = Memory.from_folder(image_folder, image_encoder, text_encoder)
    assert list(memory.classes) == ["circle", "square", "stripe"]
    assert memory.counts()["image"].tolist() == [4, 4, 4]
    sources = memory.image.metadata["source"]
    assert all(s.endswith(".png") and label in s for s, label in zip(sources,
                                                                      memory.image.labels))
    assert list(memory.text.metadata["text"][:2]) == ["A circle is a shape.", "It is drawn often!"]
    assert memory.counts()["text"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(memory.image.embeddings[0],
                               image_encoder.transform([sources[0]])[0], atol=1e-6)
    images_only = Memory.from_folder(image_folder, image_encoder)
    assert len(images_only.text) == 0 and len(images_only.image) == 12
    memory.save(tmp_path / "memory")
    loaded = Memory.load(tmp_path / "memory")
    pd.testing.assert_frame_equal(loaded.image.metadata, memory.image.metadata)
    with pytest.raises(NotADirectoryError):
        Memory.from_folder(image_folder / "nowhere", image_encoder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No images in"):
        Memory.from_folder(tmp_path / "empty", image_encoder)


def test_a_single_image_per_class_is_one_item():
    rgb = np.ones((6, 5, 3), dtype=np.uint8)  # not all-zero: a memory refuses those
    memory = build_memory({"a": rgb, "b": rgb + 9, "c": [rgb, rgb]},
                          image_encoder=IMAGE)
    assert memory.counts()["image"].tolist() == [1, 1, 2]


def _read(paths):
    from PIL import Image

    return np.stack([np.asarray(Image.open(p), dtype=np.float32).ravel() for p in paths])


def _save(path, seed):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(1, 255, (4, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_from_folder_walks_nested_class_folders(tmp_path):
    for seed, name in enumerate(["cat/b.png", "cat/indoor/a.png", "cat/indoor/deep/c.PNG",
                                 "cat/a.png", "dog/x/y/z.jpg", "cat/.cache/hidden.png",
                                 ".ipynb_checkpoints/old.png"]):
        _save(tmp_path / name, seed)
    memory = Memory.from_folder(tmp_path, FunctionTransformer(_read))
    relative = [str(Path(s).relative_to(tmp_path).as_posix())
                for s in memory.image.metadata["source"]]
    # Sorted by path within each class folder; the class is the top-level folder.
    assert relative == ["cat/a.png", "cat/b.png", "cat/indoor/a.png", "cat/indoor/deep/c.PNG",
                        "dog/x/y/z.jpg"]
    assert list(memory.image.labels) == ["cat"] * 4 + ["dog"]


def test_from_folder_loose_files_in_root(tmp_path):
    _save(tmp_path / "loose.png", 0)
    _save(tmp_path / "also.jpg", 1)
    with pytest.raises(ValueError, match=r"2 image files directly in .*expected root/<class>/"):
        Memory.from_folder(tmp_path, FunctionTransformer(_read))
    _save(tmp_path / "cat" / "a.png", 2)
    with pytest.warns(UserWarning, match="2 image files directly in .* are ignored"):
        memory = Memory.from_folder(tmp_path, FunctionTransformer(_read))
    assert list(memory.image.labels) == ["cat"]
