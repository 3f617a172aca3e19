"""Frozen encoders as scikit-learn transformers: raw images and texts to embeddings.

:class:`CLIPImageEncoder` and :class:`CLIPTextEncoder` wrap an open_clip
model, :class:`TimmImageEncoder` a timm image backbone. Each maps a list of
inputs to L2-normalised float32 embeddings ``(n, d)``, so raw data flows
through a :class:`~sklearn.pipeline.Pipeline` into the classifiers.

The encoders are stateless: nothing heavy happens in ``__init__`` or ``fit``;
the model loads on the first ``transform`` and is kept in a per-process
registry keyed by its configuration, so the image and text encoders of one
CLIP model share it, clones share it, and a pickle holds only the
configuration.
"""

import hashlib
import os
from collections import OrderedDict
import pickle
import socket
import tempfile
import threading
import urllib.parse
from numbers import Integral
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from tqdm.auto import tqdm

from .._validation import resolve_device
from ._embeddings import Embeddings

__all__ = ["CLIPImageEncoder", "CLIPTextEncoder", "TimmImageEncoder", "clear_model_cache",
           "clear_embedding_cache", "embedding_cache_info", "set_embedding_cache"]

_MODELS = {}
_LOCK = threading.Lock()
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def clear_model_cache():
    """Release every model the encoders of this process have loaded.

    The in-process embeddings of those models go too (see
    :func:`clear_embedding_cache`).
    """
    with _LOCK:
        _MODELS.clear()
    clear_embedding_cache()


class _ProcessCache:
    """Embeddings of image files computed in this process, least recently used dropped.

    Keyed by the loaded model and the file's identity (absolute path,
    modification time, size), so a changed file or another model is a miss.
    Bounded by the bytes of the rows it holds.
    """

    def __init__(self, max_bytes):
        self.max_bytes, self.nbytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.rows = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                self.misses += 1
                return None
            self.rows.move_to_end(key)
            self.hits += 1
            return row

    def put(self, key, row):
        row = np.array(row, dtype=np.float32)  # its own buffer: the batch can be freed
        row.flags.writeable = False
        with self.lock:
            old = self.rows.pop(key, None)
            self.nbytes -= 0 if old is None else old.nbytes
            if row.nbytes > self.max_bytes:
                return
            self.rows[key] = row
            self.nbytes += row.nbytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self.rows.popitem(last=False)[1].nbytes

    def resize(self, max_bytes):
        with self.lock:
            self.max_bytes = max_bytes
            while self.nbytes > self.max_bytes:
                self.nbytes -= self.rows.popitem(last=False)[1].nbytes

    def clear(self):
        with self.lock:
            self.rows.clear()
            self.nbytes = self.hits = self.misses = 0


_EMBEDDINGS = _ProcessCache(512 * 2**20)


def set_embedding_cache(max_bytes):
    """Bound the in-process cache of image-file embeddings; 0 switches it off.

    Every image encoder of this process looks an image file up in this
    cache before encoding it, so that cross-validation and grid search over
    a :class:`~sklearn.pipeline.Pipeline` that starts with an encoder
    encode each file once per process, not once per fold and candidate.
    It holds float32 rows (a 1,280-d embedding is 5 KiB, so the default of
    512 MiB holds about 100,000 of them) and drops the least recently used
    first. Files are identified by absolute path, modification time and
    size; a model by its loaded instance. The on-disk ``cache=`` of each
    encoder keeps embeddings across processes.

    Parameters
    ----------
    max_bytes : int
        Most bytes of embeddings kept; 0 disables the cache.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, Integral) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}.")
    _EMBEDDINGS.resize(int(max_bytes))


def clear_embedding_cache():
    """Empty the in-process cache of image-file embeddings and reset its counters."""
    _EMBEDDINGS.clear()


def embedding_cache_info():
    """Counters of the in-process embedding cache (as :func:`functools.lru_cache` gives).

    Returns
    -------
    info : dict
        ``hits`` and ``misses`` (file look-ups since the last clear),
        ``items`` and ``nbytes`` held, and ``max_bytes``.
    """
    cache = _EMBEDDINGS
    with cache.lock:
        return {"hits": cache.hits, "misses": cache.misses, "items": len(cache.rows),
                "nbytes": cache.nbytes, "max_bytes": cache.max_bytes}


def _shared(key, load):
    """The model of `key`, loaded once per process by `load()`."""
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load()
        return _MODELS[key]


def _require(module, extra):
    try:
        return __import__(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed; install it with `pip install skmml[{extra}]`."
        ) from error


# -- open_clip ---------------------------------------------------------------------------


def _is_local(pretrained):
    return pretrained is not None and os.path.exists(os.path.expanduser(str(pretrained)))


_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


def _check_weights_file(pretrained, encoder):
    """Raise, saying how to fix it, when `pretrained` names a weights file that is not there.

    A pickled or cloned encoder keeps the path of its weights, not the
    weights: when the file moves, the error must say where to point it.
    """
    if pretrained is None or isinstance(pretrained, bool) or _is_local(pretrained):
        return
    text = os.fspath(pretrained)
    if not (isinstance(pretrained, os.PathLike) or text.lower().endswith(_WEIGHT_SUFFIXES)
            or (os.sep in text and not text.startswith("hf-hub:"))):
        return  # a pretrained tag or hub name
    step = encoder.lower()
    raise FileNotFoundError(
        f"The weights file {text!r} of {encoder} does not exist. A pickled or cloned "
        "encoder keeps the path of its weights, not the weights: if the file moved, point "
        f"the encoder at its new place with encoder.set_params(pretrained=NEW_PATH), or in "
        f"a pipeline pipe.set_params({step}__pretrained=NEW_PATH)."
    )


def _check_hub_answers(what, timeout=3.0):
    """Raise at once, with guidance, when the Hugging Face Hub does not answer.

    Without this check an unreachable hub costs about a minute of download
    retries before the same error. With ``HF_HUB_OFFLINE=1`` nothing is
    probed: weights then come from the local Hugging Face cache only.
    """
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm and open_clip depend on it
        return
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {
            "1", "ON", "YES", "TRUE"}:
        return
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                             "http_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: a direct probe would not tell
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise OSError(
            f"Could not get the pretrained weights of {what}: the Hugging Face Hub at "
            f"{constants.ENDPOINT} does not answer ({error}). Without network access, pass "
            "a local checkpoint file as `pretrained`, or set HF_HUB_OFFLINE=1 to use "
            "weights already in your Hugging Face cache (HF_HOME)."
        ) from None


def _load_clip(model_name, pretrained, device, precision, encoder="CLIPImageEncoder"):
    """(model, preprocess, tokenizer) of an open_clip model, with errors that say what to do."""
    open_clip = _require("open_clip", "clip")
    _check_weights_file(pretrained, encoder)
    name = model_name
    source, remote = pretrained, pretrained is not None and not _is_local(pretrained)
    if pretrained is not None and str(pretrained).startswith("hf-hub:"):
        name, pretrained = str(pretrained), None
    elif _is_local(pretrained):
        pretrained = os.path.expanduser(str(pretrained))
    if not name.startswith("hf-hub:") and name not in open_clip.list_models():
        raise ValueError(
            f"Unknown open_clip model {name!r}: open_clip.list_models() lists the known "
            "ones, and open_clip.add_model_config() registers a custom one."
        )
    if remote:
        _check_hub_answers(f"{model_name!r} from {source!r}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision
        )
    except Exception as error:  # noqa: BLE001 - re-raised with guidance
        if not remote:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise OSError(
            f"Could not get the pretrained weights of {model_name!r} from {source!r}"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {error}. Without network access, "
            "download the checkpoint elsewhere and pass its local path as `pretrained`, or "
            "point HF_HOME at a Hugging Face cache that holds it."
        ) from error
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(name)


# -- image inputs ------------------------------------------------------------------------


def _describe(item):
    if isinstance(item, (str, Path)):
        return repr(str(item))
    if isinstance(item, np.ndarray):
        return f"array of shape {item.shape} and dtype {item.dtype}"
    return type(item).__name__


def _image_items(X):
    """The images of `X` as a list, checked without decoding them.

    A list, tuple, 1-d array or pandas Series holds one image per element
    (a one-column DataFrame, its column); a 3-d uint8 array is ``n``
    greyscale images and a 4-d one ``n`` colour images.
    """
    from PIL import Image

    X = _column(X, "images")
    if isinstance(X, (str, Path, Image.Image)):
        raise TypeError(
            "transform() takes a collection of images; wrap a single image in a list."
        )
    if isinstance(X, np.ndarray) and X.ndim == 3 and X.shape[-1] in (3, 4):
        raise ValueError(
            f"An array of shape {X.shape} looks like one colour image; pass [image] for one "
            "image, or an array of shape (n, H, W, 3) for several."
        )
    if isinstance(X, np.ndarray) and X.ndim in (3, 4) and X.dtype != object:
        items = list(X)
    elif isinstance(X, np.ndarray) and X.ndim != 1:
        raise ValueError(
            f"Expected a list of images or an array of shape (n, H, W) or (n, H, W, 3); "
            f"got an array of shape {X.shape}."
        )
    else:
        try:
            items = list(X)
        except TypeError:
            raise TypeError(
                f"Expected a collection of images, got {type(X).__name__}."
            ) from None
    if not items:
        raise ValueError("No images: the input is empty.")
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            if not os.path.isfile(item):
                raise FileNotFoundError(f"Image {i}: no such file {str(item)!r}.")
        elif isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or not (
                item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))
            ):
                raise ValueError(
                    f"Image {i}: expected a uint8 array of shape (H, W) or (H, W, 3), got an "
                    f"{_describe(item)}."
                )
        elif not isinstance(item, Image.Image):
            raise TypeError(
                f"Image {i}: expected a file path, a PIL image or a uint8 array, got "
                f"{type(item).__name__}."
            )
    return items


def _to_rgb(item):
    from PIL import Image

    if isinstance(item, np.ndarray):
        item = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)
    elif not isinstance(item, Image.Image):
        with Image.open(item) as image:
            return _eight_bit(image).convert("RGB")
    return _eight_bit(item).convert("RGB")


def _eight_bit(image):
    """16-bit and float greyscale images scaled to 8 bits (PIL's convert would clip them)."""
    from PIL import Image

    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float32)
    top = 65535.0 if image.mode.startswith("I") else max(float(pixels.max()), 1.0)
    return Image.fromarray(np.rint(pixels * (255.0 / top)).clip(0, 255).astype(np.uint8))


class _Images:
    """Map-style dataset: decode and preprocess image `i`, naming it on failure.

    `positions` are the items' places in the caller's input, so an error
    names the file the user counts (the 8th), not its place among the
    images left to encode.
    """

    def __init__(self, items, preprocess, positions=None):
        self.items, self.preprocess = items, preprocess
        self.positions = range(len(items)) if positions is None else positions

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            image = _to_rgb(self.items[i])
        except Exception as error:  # noqa: BLE001 - re-raised naming the image
            raise ValueError(
                f"Image {self.positions[i]} ({_describe(self.items[i])}) could not be read: "
                f"{error}"
            ) from error
        return self.preprocess(image)


def _file_key(model, path):
    """What identifies a file's embedding in this process: the model, the file's identity."""
    path = os.path.abspath(path)
    stat = os.stat(path)
    return (id(model), path, stat.st_mtime_ns, stat.st_size)


class _Computed:
    """Where the rows computed by one ``transform`` go: disk entries and process keys."""

    def __init__(self, items, entries, keys, disk):
        self.items, self.entries, self.keys, self.disk = items, entries, keys, disk


class _EmbeddingCache:
    """On-disk embeddings of image files, keyed by path, mtime, size and model.

    One ``.npy`` file per image under ``location/skmml-embeddings/<model>/``;
    no pickle.
    """

    def __init__(self, location, model_key):
        folder = hashlib.sha1(repr(model_key).encode()).hexdigest()[:16]
        self.root = Path(location) / "skmml-embeddings" / folder

    def path(self, file):
        stat = os.stat(file)
        key = f"{os.path.abspath(file)}|{stat.st_mtime_ns}|{stat.st_size}"
        return self.root / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def store(self, path, embedding):
        """Write one entry atomically (a temporary file, then a rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.width() is None:
            self._write(self.root / "width", np.int64(embedding.shape[0]))
        self._write(path, embedding)

    def _write(self, path, array):
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)

    def width(self):
        """The model's embedding width as first stored, or None."""
        try:
            width = np.load(self.root / "width", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return int(width) if width.shape == () and width.dtype.kind == "i" else None


def _read_entry(path):
    """A cached embedding, or None when missing, unreadable or invalid (then recomputed).

    Valid: a 1-D float32 array, finite, of unit norm (what :meth:`store` writes);
    a zero-byte, truncated, NaN or wrong-shaped entry is not.
    """
    try:
        row = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if row.ndim != 1 or row.dtype != np.float32 or not row.size:
        return None
    if not np.all(np.isfinite(row)) or abs(float(np.linalg.norm(row)) - 1.0) > 1e-3:
        return None
    return row


def _weights_id(pretrained):
    """What identifies the weights: a local file by path, time and size; else the name."""
    if _is_local(pretrained):
        path = os.path.abspath(os.path.expanduser(str(pretrained)))
        stat = os.stat(path)
        return f"{path}|{stat.st_mtime_ns}|{stat.st_size}"
    return str(pretrained)


_COMMON_CONSTRAINTS = {
    "device": [StrOptions({"auto", "cpu", "cuda"})],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "precision": [StrOptions(set(_DTYPES))],
    "verbose": ["verbose"],
}


class _Encoder(TransformerMixin, BaseEstimator):
    """Shared machinery: stateless fit, batching, progress, normalisation."""

    def fit(self, X=None, y=None):
        """Check the parameters; the encoder is frozen, so nothing is learned.

        Parameters
        ----------
        X : ignored
        y : ignored

        Returns
        -------
        self
        """
        self._validate_params()
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.non_deterministic = self.device != "cpu"
        return tags

    def get_feature_names_out(self, input_features=None):
        """Names of the output features, one per embedding dimension.

        ``"<class name in lower case><i>"``, as scikit-learn's encoders that
        make new features name them; this loads the model to learn its
        embedding width. With it, ``set_output(transform="pandas")`` and
        feature-name propagation in a Pipeline work as in scikit-learn.

        Parameters
        ----------
        input_features : ignored
            The inputs are images or texts, not named columns.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        prefix = type(self).__name__.lower()
        return np.asarray([f"{prefix}{i}" for i in range(self._output_width())], dtype=object)

    def _model_key(self):
        """What identifies the model: kind, architecture, weights and precision."""
        return (self._kind, self.model_name, _weights_id(self.pretrained), self.precision)

    def _batches(self, n):
        return tqdm(range(0, n, self.batch_size), desc=type(self).__name__,
                    disable=not self.verbose, unit="batch")


class _ImageEncoder(_Encoder):
    """Image inputs: paths, PIL images, uint8 arrays; parallel decoding; file cache."""

    _parameter_constraints = {
        **_COMMON_CONSTRAINTS,
        "num_workers": [Interval(Integral, 0, None, closed="left")],
        "cache": [str, os.PathLike, HasMethods(["cache"]), None],
    }

    def _workers(self, n_items):
        # One batch: starting worker processes costs more than it saves.
        return 0 if n_items <= self.batch_size else self.num_workers

    def transform(self, X):
        """Embed images.

        Image files already embedded by this process's model are not
        encoded again (see :func:`~skmml.encoders.set_embedding_cache`); with
        ``cache=`` set, neither are those in the on-disk cache.

        Parameters
        ----------
        X : list of images, array of shape (n, H, W) or (n, H, W, 3), pandas Series or one-column DataFrame
            File paths (str or :class:`pathlib.Path`), PIL images, or uint8
            arrays of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4, RGBA);
            greyscale is converted to RGB. A single image goes in a list.

        Returns
        -------
        embeddings : ndarray of shape (n, d), float32, unit rows
            An :class:`~skmml.encoders.Embeddings` array that carries the
            file path of each row (``sources``) when `X` holds file paths.
        """
        self._validate_params()
        items = _image_items(X)
        sources = [str(item) if isinstance(item, (str, Path)) else None for item in items]
        model = self._image_model()[0]
        keys = [None] * len(items)
        if _EMBEDDINGS.max_bytes:
            keys = [None if source is None else _file_key(model, source) for source in sources]
        rows = [None if key is None else _EMBEDDINGS.get(key) for key in keys]
        disk = self._cache()
        entries = [None] * len(items)
        if disk is not None:
            entries = [None if source is None else disk.path(source) for source in sources]
            for i, entry in enumerate(entries):
                if entry is None:
                    continue
                if rows[i] is None:
                    rows[i] = _read_entry(entry)
                elif not entry.exists():  # known to this process only: keep it across runs
                    disk.store(entry, rows[i])
        computed = _Computed(items, entries, keys, disk)
        width = self._fill(rows, [i for i, row in enumerate(rows) if row is None], computed)
        if disk is not None:
            # An entry of another width than the model's output is corrupt too.
            widths = [row.shape[0] for row in rows]
            width = width or disk.width() or max(set(widths), key=widths.count)
            self._fill(rows, [i for i, w in enumerate(widths) if w != width], computed)
        out = np.stack(rows).astype(np.float32, copy=False)
        return out if all(source is None for source in sources) else Embeddings(out, sources)

    def _fill(self, rows, todo, computed):
        """Compute the rows at `todo` and cache them; their width, or None."""
        width = None
        if not todo:
            return width
        for i, row in zip(todo, self._encode([computed.items[i] for i in todo], todo)):
            rows[i] = row
            width = row.shape[0]
            if computed.entries[i] is not None:
                computed.disk.store(computed.entries[i], row)
            if computed.keys[i] is not None:
                _EMBEDDINGS.put(computed.keys[i], row)
        return width

    def _cache(self):
        if self.cache is None:
            return None
        if self.pretrained is None or self.pretrained is False:
            raise ValueError(
                "cache= needs fixed weights: pretrained=None/False gives random weights "
                "that differ in each process, so cached embeddings would not match."
            )
        location = getattr(self.cache, "location", self.cache)  # a joblib.Memory or a folder
        if location is None:
            return None
        return _EmbeddingCache(location, self._model_key())

    def _encode(self, items, positions=None):
        """Embeddings of `items`, which sit at `positions` of the input (for errors)."""
        import torch

        model, preprocess, device = self._image_model()
        loader = torch.utils.data.DataLoader(
            _Images(items, preprocess, positions), batch_size=self.batch_size,
            num_workers=self._workers(len(items)), pin_memory=device == "cuda",
        )
        dtype = getattr(torch, _DTYPES[self.precision])
        out = np.empty((len(items), 0), dtype=np.float32)
        start = 0
        bar = tqdm(total=len(items), desc=type(self).__name__, disable=not self.verbose,
                   unit="img")
        with torch.inference_mode():
            for batch in loader:
                features = self._forward(model, batch.to(device, dtype, non_blocking=True))
                features = torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()
                if not start:
                    out = np.empty((len(items), features.shape[1]), dtype=np.float32)
                out[start:start + len(features)] = features
                start += len(features)
                bar.update(len(features))
        bar.close()
        return out


class _CLIPModel:
    """The open_clip model shared by the image and text encoders of one configuration."""

    _kind = "clip"

    def _clip(self):
        device = resolve_device(self.device)
        return device, _shared(self._model_key() + (device,), lambda: _load_clip(
            self.model_name, self.pretrained, device, self.precision, type(self).__name__))

    def _output_width(self):
        return int(self._clip()[1][0].visual.output_dim)


class CLIPImageEncoder(_CLIPModel, _ImageEncoder):
    """Embed images with an open_clip CLIP model's image tower.

    Parameters
    ----------
    model_name : str, default="ViT-B-32"
        An open_clip architecture (``open_clip.list_models()``), including
        configurations registered with ``open_clip.add_model_config``.
    pretrained : str or path-like, default="openai"
        An open_clip pretrained tag (e.g. "openai", "laion2b_s34b_b79k"),
        an ``hf-hub:org/repo`` id, a local checkpoint file, or None for
        random weights. A local file loads with no network access; tags and
        hub ids are fetched by open_clip into the Hugging Face cache and
        honour ``HF_HUB_OFFLINE`` / ``HF_HOME``.
    device : {"auto", "cpu", "cuda"}, default="auto"
        "auto" picks CUDA when torch sees a GPU.
    batch_size : int, default=64
        Images per forward pass.
    precision : {"fp32", "fp16", "bf16"}, default="fp32"
        Precision of the model weights and inputs; the output is float32.
    num_workers : int, default=1
        Worker processes (a torch DataLoader's) that decode and preprocess
        images while the model runs; 0 decodes in the calling process (needed
        inside daemonic worker processes). Inputs that fit in one batch are
        decoded in-process.
    cache : str, path-like or joblib.Memory, default=None
        Folder of an on-disk cache of the embeddings of image *files*, keyed
        by path, modification time, size and model configuration.
    verbose : int, default=0
        Show a progress bar.

    See Also
    --------
    CLIPTextEncoder : the text tower of the same model (shared in memory).
    TimmImageEncoder : image-only backbones from timm.

    Examples
    --------
    A tiny custom architecture with random weights (``pretrained=None``);
    with a network, ``CLIPImageEncoder()`` is OpenAI's ViT-B/32:

    >>> import json, pathlib, tempfile
    >>> import numpy as np, open_clip
    >>> from skmml import CLIPImageEncoder
    >>> config = {"embed_dim": 16,
    ...           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
    ...                          "head_width": 16, "patch_size": 16},
    ...           "text_cfg": {"context_length": 77, "vocab_size": 49408,
    ...                        "width": 32, "heads": 2, "layers": 1}}
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = pathlib.Path(folder.name) / "tiny-clip.json"
    >>> _ = path.write_text(json.dumps(config))
    >>> open_clip.add_model_config(path)
    >>> folder.cleanup()
    >>> encoder = CLIPImageEncoder("tiny-clip", pretrained=None, device="cpu")
    >>> images = np.random.default_rng(0).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
    >>> encoder.transform(images).shape
    (2, 16)
    """

    _parameter_constraints = {
        **_ImageEncoder._parameter_constraints,
        "model_name": [str],
        "pretrained": [str, os.PathLike, None],
    }

    def __init__(self, model_name="ViT-B-32", pretrained="openai", *, device="auto",
                 batch_size=64, precision="fp32", num_workers=1, cache=None, verbose=0):
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.num_workers = num_workers
        self.cache = cache
        self.verbose = verbose

    def _image_model(self):
        device, (model, preprocess, _) = self._clip()
        return model, preprocess, device

    @staticmethod
    def _forward(model, batch):
        return model.encode_image(batch)


class CLIPTextEncoder(_CLIPModel, _Encoder):
    """Embed texts with an open_clip CLIP model's text tower.

    Texts longer than the model's context length (77 tokens for CLIP) are
    truncated by the tokenizer.

    Parameters
    ----------
    model_name : str, default="ViT-B-32"
        As for :class:`CLIPImageEncoder`; the same model and ``pretrained``
        share one loaded model.
    pretrained : str or path-like, default="openai"
        As for :class:`CLIPImageEncoder`.
    device : {"auto", "cpu", "cuda"}, default="auto"
    batch_size : int, default=256
        Texts per forward pass.
    precision : {"fp32", "fp16", "bf16"}, default="fp32"
    verbose : int, default=0
        Show a progress bar.

    Examples
    --------
    The tiny model of :class:`CLIPImageEncoder`'s example:

    >>> import json, pathlib, tempfile
    >>> import open_clip
    >>> from skmml import CLIPTextEncoder
    >>> config = {"embed_dim": 16,
    ...           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
    ...                          "head_width": 16, "patch_size": 16},
    ...           "text_cfg": {"context_length": 77, "vocab_size": 49408,
    ...                        "width": 32, "heads": 2, "layers": 1}}
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = pathlib.Path(folder.name) / "tiny-clip.json"
    >>> _ = path.write_text(json.dumps(config))
    >>> open_clip.add_model_config(path)
    >>> folder.cleanup()
    >>> encoder = CLIPTextEncoder("tiny-clip", pretrained=None, device="cpu")
    >>> encoder.transform(["a photo of a cat.", "a photo of a dog."]).shape
    (2, 16)
    """

    _parameter_constraints = {
        **_COMMON_CONSTRAINTS,
        "model_name": [str],
        "pretrained": [str, os.PathLike, None],
    }


    def __init__(self, model_name="ViT-B-32", pretrained="openai", *, device="auto",
                 batch_size=256, precision="fp32", verbose=0):
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        return tags

    def transform(self, X):
        """Embed texts.

        Parameters
        ----------
        X : list of str
            The texts (a 1-d array, a pandas Series or a one-column
            DataFrame of str works too).

        Returns
        -------
        embeddings : ndarray of shape (n, d), float32, unit rows
        """
        import torch

        self._validate_params()
        texts = _texts(X)
        device, (model, _, tokenizer) = self._clip()
        out = None
        with torch.inference_mode():
            for start in self._batches(len(texts)):
                tokens = tokenizer(texts[start:start + self.batch_size]).to(device)
                features = torch.nn.functional.normalize(
                    model.encode_text(tokens).float(), dim=1).cpu().numpy()
                if out is None:
                    out = np.empty((len(texts), features.shape[1]), dtype=np.float32)
                out[start:start + len(features)] = features
        return out


def _column(X, what):
    """The one column of a DataFrame (iterating a DataFrame gives its column names)."""
    if hasattr(X, "columns") and hasattr(X, "iloc"):
        if X.shape[1] != 1:
            raise ValueError(
                f"Expected one column of {what}, got a DataFrame with {X.shape[1]} columns "
                f"{list(X.columns)[:5]}: select the column, e.g. X[{X.columns[0]!r}], or "
                "use a ColumnTransformer."
            )
        return X.iloc[:, 0]
    return X


def _texts(X):
    X = _column(X, "texts")
    if isinstance(X, str):
        raise TypeError("transform() takes a collection of texts; wrap a single text in a list.")
    try:
        texts = list(X)
    except TypeError:
        raise TypeError(f"Expected a collection of texts, got {type(X).__name__}.") from None
    if not texts:
        raise ValueError("No texts: the input is empty.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"Text {i} is a {type(text).__name__}, not a str: {text!r:.80}.")
    return texts


# -- timm --------------------------------------------------------------------------------


def _read_state_dict(path):
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds Python objects besides tensors (e.g. a training checkpoint's "
            "arguments), which are not loaded for safety; save `model.state_dict()` alone."
        ) from error
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict ({type(state).__name__}).")
    return state


def _load_state_dict(model, state, path):
    """Load the backbone of `state` into `model`, ignoring any classifier.

    Tensors are matched by name, or, failing that, position by position when
    every shape matches in order: that loads checkpoints saved from a
    re-implementation with other parameter names (e.g. ``efficientnet_pytorch``
    weights into timm's ``tf_efficientnet_lite0``). A classifier in the
    checkpoint (of any number of classes) or none at all both work.
    """
    head = model.default_cfg.get("classifier") or ()
    heads = (head,) if isinstance(head, str) else tuple(head)
    in_head = lambda name: any(name.startswith(h + ".") for h in heads)  # noqa: E731
    body = {k: v for k, v in model.state_dict().items() if not in_head(k)}
    if set(body) <= set(state):
        model.load_state_dict({k: state[k] for k in body}, strict=False)
        return
    values = list(state.values())
    for source in (values, values[:len(body)]):  # whole checkpoint, or without a trailing head
        if len(source) == len(body) and all(
                a.shape == b.shape for a, b in zip(source, body.values())):
            model.load_state_dict(dict(zip(body, source)), strict=False)
            return
    raise ValueError(
        f"{path} does not fit {type(model).__name__}: its {len(state)} tensors match the "
        f"model's {len(body)} backbone tensors neither by name nor by position and shape."
    )


def _load_timm(model_name, pretrained, device, precision):
    timm = _require("timm", "timm")
    import torch

    if model_name not in timm.list_models() and model_name not in timm.list_models(
            pretrained=True):
        raise ValueError(f"Unknown timm model {model_name!r}: timm.list_models() lists them.")
    if isinstance(pretrained, bool):
        if pretrained:
            _check_hub_answers(f"timm's {model_name!r}")
        try:
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
        except Exception as error:  # noqa: BLE001 - re-raised with guidance
            if not pretrained:
                raise
            raise OSError(
                f"Could not get the pretrained weights of timm's {model_name!r}: {error}. "
                "Without network access, pass a local checkpoint file as `pretrained`."
            ) from error
    else:
        _check_weights_file(pretrained, "TimmImageEncoder")
        path = os.path.expanduser(str(pretrained))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The weights {path!r} of TimmImageEncoder are not a file.")
        model = timm.create_model(model_name, pretrained=False)
        _load_state_dict(model, _read_state_dict(path), path)
        model.reset_classifier(0)
    config = timm.data.resolve_model_data_config(model)
    preprocess = timm.data.create_transform(**config, is_training=False)
    model = model.to(device=device, dtype=getattr(torch, _DTYPES[precision])).eval()
    return model, preprocess


class TimmImageEncoder(_ImageEncoder):
    """Embed images with a timm backbone (DINOv2, EfficientNet, ResNet, ...).

    The classifier is removed (``num_classes=0``): the embedding is the
    backbone's pooled feature, L2-normalised. Preprocessing is timm's
    evaluation transform for the model.

    Parameters
    ----------
    model_name : str, default="vit_small_patch14_dinov2.lvd142m"
        A timm model name (``timm.list_models()``).
    pretrained : bool, str or path-like, default=True
        True fetches timm's pretrained weights (Hugging Face Hub, honouring
        ``HF_HUB_OFFLINE`` / ``HF_HOME``), False keeps random weights, and a
        file path loads that state dict with no network access: by parameter
        name, or position by position when the names differ but every shape
        matches in order.
    device : {"auto", "cpu", "cuda"}, default="auto"
    batch_size : int, default=64
    precision : {"fp32", "fp16", "bf16"}, default="fp32"
    num_workers : int, default=1
        Decoding worker processes, as for :class:`CLIPImageEncoder`.
    cache : str, path-like or joblib.Memory, default=None
        On-disk cache of the embeddings of image files.
    verbose : int, default=0

    Examples
    --------
    >>> import numpy as np
    >>> from skmml import TimmImageEncoder
    >>> encoder = TimmImageEncoder("resnet18", pretrained=False, device="cpu")
    >>> encoder.transform(np.zeros((3, 32, 32), dtype=np.uint8)).shape
    (3, 512)
    """

    _parameter_constraints = {
        **_ImageEncoder._parameter_constraints,
        "model_name": [str],
        "pretrained": ["boolean", str, os.PathLike],
    }
    _kind = "timm"

    def __init__(self, model_name="vit_small_patch14_dinov2.lvd142m", pretrained=True, *,
                 device="auto", batch_size=64, precision="fp32", num_workers=1, cache=None,
                 verbose=0):
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        self.num_workers = num_workers
        self.cache = cache
        self.verbose = verbose

    def _output_width(self):
        model = self._image_model()[0]
        return int(getattr(model, "head_hidden_size", None) or model.num_features)

    def _image_model(self):
        device = resolve_device(self.device)
        model, preprocess = _shared(self._model_key() + (device,), lambda: _load_timm(
            self.model_name, self.pretrained, device, self.precision))
        return model, preprocess, device

    @staticmethod
    def _forward(model, batch):
        return model(batch)
