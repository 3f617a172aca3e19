"""VLMReranker: a vision-language model answers from the query and its labelled neighbors.

The visual-memory paper's strongest result (Geirhos et al., 2024): Gemini,
shown the query image with its nearest memory images and their labels in
context, answers the label: 88.5% on ImageNet with 50 in-context neighbors,
87.4% with 10, against 83.6% for DINOv2 kNN voting and 69.6% for the same
model with no neighbors. Here any Hugging Face ``transformers``
image-text-to-text model plays that part, loaded lazily from a local folder
(or the Hub, with network access).
"""

import difflib
import os
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path

import numpy as np
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions

from .._validation import resolve_device
from ._rerank import BaseReranker

#: The question after the query image. ``{labels}``: the neighbors' labels
#: (each once, nearest first); ``{classes}``: every class of the memory.
DEFAULT_PROMPT = (
    "Each image above but the last is followed by its label; they are the last image's "
    "nearest neighbors in a labelled memory. What is the label of the last image? Answer "
    "with the label only, for example one of: {labels}."
)


class VLMReranker(BaseReranker):
    """Re-rank with a vision-language model shown the query and its labelled neighbors.

    For each query, the model gets the top `n_neighbors` candidates' images,
    each followed by the text ``"Label: <label>"``, nearest first, then the
    query image and `prompt`; it generates an answer, which :meth:`parse`
    maps to a class (exact match, then case-insensitive, then the most
    similar class name by :mod:`difflib`). An answer that matches no class,
    or a query whose image is unknown, keeps the vote. One model call per
    query (batched by `batch_size`).

    Images come from files: the queries' from their ``sources`` (pass the
    output of a skmml image encoder, e.g. through a
    :func:`~skmml.pipeline.make_pipeline`), the neighbors' from the memory's
    ``"source"`` metadata (or `images`).

    Parameters
    ----------
    model : str, path or transformers model
        A local folder saved by ``save_pretrained`` or a Hugging Face Hub
        name (loading from the Hub needs network access; offline, download
        it elsewhere and pass the folder), loaded with
        ``AutoModelForImageTextToText`` on first use; or a loaded model.
    processor : str, path, transformers processor or None, default=None
        Its ``AutoProcessor``; None loads it from `model`'s folder or name.
    n_neighbors : int, default=10
        Neighbors shown in context, the nearest (0 shows the query alone).
    prompt : str, default=DEFAULT_PROMPT
        The question after the query image; ``{labels}`` is replaced by the
        shown neighbors' labels, ``{classes}`` by every class.
    images : None, str, mapping or array-like, default=None
        The memory items' images: None uses the metadata column
        ``"source"``; a str names another metadata column (file paths, PIL
        images or uint8 arrays); a mapping or array is indexed by memory id.
    device : {"cpu", "cuda", "auto"}, default="cpu"
        Where the model runs.
    max_new_tokens : int, default=20
        Tokens generated per answer.
    batch_size : int or None, default=1
        Queries per generation call (padded on the left); None: all at once.
    model_kwargs : dict or None, default=None
        Keyword arguments of ``from_pretrained``, e.g. ``{"dtype": "bfloat16"}``.

    Notes
    -----
    The loaded model and processor are cached on the re-ranker but never
    pickled nor cloned: a pickled classifier holds the folder's name and
    loads the model again on first use. Call :meth:`load` to load it now
    (and see loading errors as errors: during ``predict`` a failing
    re-ranker only warns and keeps the vote).

    Examples
    --------
    >>> from skmml import KNNVoteClassifier
    >>> from skmml.neighbors import VLMReranker
    >>> clf = KNNVoteClassifier(reranker=VLMReranker("path/to/SmolVLM", n_neighbors=10))
    >>> VLMReranker.parse("  Tabby cat.", ["dog", "tabby cat"])
    'tabby cat'
    """

    _parameter_constraints = {
        "model": [str, os.PathLike, HasMethods(["generate"])],
        "processor": [str, os.PathLike, callable, None],
        "n_neighbors": [Interval(Integral, 0, None, closed="left")],
        "prompt": [str],
        "images": [str, Mapping, "array-like", None],
        "device": [StrOptions({"cpu", "cuda", "auto"})],
        "max_new_tokens": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "model_kwargs": [dict, None],
    }

    def __init__(self, model, processor=None, *, n_neighbors=10, prompt=DEFAULT_PROMPT,
                 images=None, device="cpu", max_new_tokens=20, batch_size=1,
                 model_kwargs=None):
        self.model = model
        self.processor = processor
        self.n_neighbors = n_neighbors
        self.prompt = prompt
        self.images = images
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.model_kwargs = model_kwargs

    # -- the protocol ------------------------------------------------------------------

    def rerank(self, context):
        """One label per query (None where there is no answer).

        Parameters
        ----------
        context : RerankContext

        Returns
        -------
        labels : ndarray of shape (n_queries,), object
        """
        prompts = self.prompts(context)
        asked = [q for q, p in enumerate(prompts) if p is not None]
        labels = np.full(context.n_queries, None, dtype=object)
        if asked:
            answers = self.generate([prompts[q] for q in asked])
            if len(answers) != len(asked):
                raise ValueError(f"generate() gave {len(answers)} answers for "
                                 f"{len(asked)} prompts.")
            for q, answer in zip(asked, answers):
                labels[q] = self.parse(answer, context.classes)
        return labels

    # -- the steps, each replaceable ---------------------------------------------------

    def prompts(self, context):
        """The chat messages and images of each query, None where its image is unknown.

        Parameters
        ----------
        context : RerankContext

        Returns
        -------
        prompts : list of (messages, images) or None
            ``messages``: one user turn in the Hugging Face chat format,
            ``{"type": "image"}`` entries in the order of ``images`` (PIL
            images): the neighbors nearest first, then the query.
        """
        item_image = self._item_images(context)
        sources = context.query_sources
        classes = ", ".join(str(c) for c in context.classes)
        prompts = []
        for q in range(context.n_queries):  # one prompt per query, by nature
            if sources is None or sources[q] is None:
                prompts.append(None)
                continue
            shown = np.flatnonzero(context.mask[q])[:self.n_neighbors]
            labels = [str(label) for label in context.labels[q, shown]]
            content, images = [], []
            for j, label in zip(shown, labels):
                content += [{"type": "image"}, {"type": "text", "text": f"Label: {label}"}]
                images.append(_pil(item_image(q, j)))
            question = self.prompt.format(labels=", ".join(dict.fromkeys(labels)),
                                          classes=classes)
            content += [{"type": "image"}, {"type": "text", "text": question}]
            images.append(_pil(sources[q]))
            prompts.append(([{"role": "user", "content": content}], images))
        return prompts

    def generate(self, prompts):
        """The model's answer (text) to each prompt, in one batch.

        Override it to ask another model, e.g. one behind an API.

        Parameters
        ----------
        prompts : list of (messages, images)
            As :meth:`prompts` makes them.

        Returns
        -------
        answers : list of str
        """
        import torch

        model, processor = self._loaded()
        texts = [_chat_text(processor, messages) for messages, _ in prompts]
        inputs = processor(text=texts, images=[images for _, images in prompts],
                           return_tensors="pt", padding=True)
        inputs = inputs.to(model.device).to(model.dtype)  # casts the float tensors only
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                 do_sample=False)
        decode = getattr(processor, "batch_decode", None) or processor.tokenizer.batch_decode
        return decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    @staticmethod
    def parse(answer, classes):
        """The class an answer names, or None.

        The answer's first line, stripped of spaces and surrounding
        punctuation, matched to the classes' names: exactly, then ignoring
        case, then the most similar name (:func:`difflib.get_close_matches`,
        cutoff 0.6).

        Parameters
        ----------
        answer : str
        classes : array-like
            The classes; matched through ``str(class)``.

        Returns
        -------
        label : element of `classes` or None
        """
        lines = str(answer).strip().splitlines()
        text = lines[0].strip().strip(" .,;:!?\"'`*") if lines else ""
        names = [str(c) for c in classes]
        if not text:
            return None
        for candidates, key in ((names, text), ([n.lower() for n in names], text.lower())):
            if key in candidates:
                return classes[candidates.index(key)]
        lowered = [n.lower() for n in names]
        close = difflib.get_close_matches(text.lower(), lowered, n=1, cutoff=0.6)
        return classes[lowered.index(close[0])] if close else None

    # -- loading -----------------------------------------------------------------------

    def load(self):
        """Load the model and processor now (otherwise they load on first use).

        Returns
        -------
        self : VLMReranker
        """
        self._loaded()
        return self

    def _loaded(self):
        """(model, processor), loaded once per parameter set."""
        key = tuple(p if isinstance(p, (str, os.PathLike, type(None))) else id(p)
                    for p in (self.model, self.processor)) + (self.device,
                                                              repr(self.model_kwargs))
        cached = self.__dict__.get("_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = resolve_device(self.device)
        model = self.model
        if isinstance(model, (str, os.PathLike)):
            model = _pretrained(AutoModelForImageTextToText, model, **(self.model_kwargs or {}))
        model = model.to(device).eval()
        processor = self.processor
        if processor is None:
            processor = self.model if isinstance(self.model, (str, os.PathLike)) else (
                getattr(model, "name_or_path", None))
            if not processor:
                raise ValueError("Pass processor= with a loaded model.")
        if isinstance(processor, (str, os.PathLike)):
            processor = _pretrained(AutoProcessor, processor)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # a batch generates after its prompts
        self._cache = (key, (model, processor))
        return model, processor

    def _item_images(self, context):
        """A function (query, candidate) -> the candidate's image."""
        images = self.images
        if images is None or isinstance(images, str):
            column = context.metadata.get(images or "source")
            if column is None:
                raise ValueError(
                    f"The memory has no metadata column {images or 'source'!r} to read the "
                    "neighbors' images from: pass images= (an array or mapping by id).")
            return lambda q, j: column[q, j]
        if not isinstance(images, Mapping):
            images = np.asarray(images) if not isinstance(images, (list, tuple)) else images
        return lambda q, j: images[int(context.ids[q, j])]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_cache", None)  # the weights stay out; reloaded on first use
        return state


def _pretrained(loader, name, **kwargs):
    """``loader.from_pretrained(name)``; offline, an error that says to pass a local folder."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        if Path(name).exists():
            raise
        raise OSError(
            f"Could not load {str(name)!r}: it is not a local folder, and fetching it from "
            f"the Hugging Face Hub needs network access ({exc}). Without network access, "
            f"pass a local folder: download the model where there is network (e.g. `hf "
            f"download {name} --local-dir DIR`), copy DIR here and pass its path."
        ) from exc


def _chat_text(processor, messages):
    """The prompt text: the processor's chat template, else its image token in place."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or "<image>"
    return " ".join(token if part["type"] == "image" else part["text"]
                    for message in messages for part in message["content"])


def _pil(image):
    """A path, PIL image or uint8 array as an RGB PIL image."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if hasattr(image, "convert"):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"An image must be a file, a PIL image or a uint8 array, got "
                         f"{array.dtype} values.")
    return Image.fromarray(array).convert("RGB")
