"""ExplanationDisplay: a decision explained as a picture of the memory items behind it."""

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.utils import _safe_indexing

from .memory._sources import IMAGE_EXTENSIONS

# The panel grid, in inches: a readable size whatever k is.
_MAX_COLUMNS = 6
_CELL_WIDTH = 1.7
_IMAGE_SIZE = 1.3
_TITLE_HEIGHT = 0.55   # three title lines at 8 pt above each panel
_HEADER_HEIGHT = 0.3   # a line above each block of panels
_TOP_TITLE = 0.45      # the figure title, inside the figure
_MARGIN = 0.1
_FONT = 8


class ExplanationDisplay:
    """The query and its retrieved memory items: image, label, similarity, vote.

    Built from a classifier (:meth:`from_estimator`) or from the DataFrame of
    its ``explain`` (:meth:`from_explanation`), as scikit-learn's displays
    are. With images, :meth:`plot` draws a grid: the query (titled with the
    prediction), then its highest-ranked neighbors in rank order, wrapping
    after six panels, each titled with its label, cosine similarity and
    weight (the vote of :class:`~skmml.KNNVoteClassifier`, or the attention
    of :class:`~skmml.MemoryModularClassifier`, one labelled block of rows
    per modality; a text item shows its text). A line above each block says
    how many of the neighbors are shown. Without images it draws a bar chart
    of the weights per class. An explanation of a classifier with a
    ``reranker`` shows both stages: the query panel is titled with the vote
    and the re-ranker's answer ("vote: 3 / reranked: 5"), and why the
    re-ranker fell back if it did.

    Parameters
    ----------
    explanation : pandas.DataFrame
        The rows of *one* query from ``explain``: ``modality``, ``rank``,
        ``id``, ``label``, ``similarity`` and ``weight``, then metadata
        columns (and ``vote_label``, ``reranked_label``, ``rerank_fallback``
        after a re-ranker).
    images : None, str, mapping or array-like, default=None
        The memory items' images: a mapping or array indexed by memory id
        (e.g. the array the memory was built from, when its ids are its
        rows), or the name of a metadata column of file paths or arrays.
        None uses the metadata column ``"source"`` (set by
        :meth:`~skmml.Memory.from_folder`) when there is one.
    query_image : None, path or array, default=None
        The query's image, drawn first. None uses the explanation's
        ``"query_source"`` column when there is one, else leaves the query
        panel empty.
    title : str, default=None
        Figure title, drawn inside the figure (kept by a plain ``savefig``).
    max_neighbors : int or None, default=10
        Draw at most this many neighbors per modality, the highest-ranked
        ones, so that a large ``n_neighbors`` stays readable; None draws
        all. The weights per class of the bar chart always sum all rows.
    prediction : object, default=None
        The predicted class, shown in the query panel's title. None takes
        the explanation's ``reranked_label`` when there is one, else the
        class with the largest summed weight over the rows, which is what a
        vote gives.

    Attributes
    ----------
    figure_ : matplotlib.figure.Figure
    ax_ : matplotlib.axes.Axes
        The axes the display was drawn in.
    axes_ : list of matplotlib.axes.Axes
        One panel per image (query first), or ``[ax_]`` for the bar chart.
    prediction_ : object
        The predicted class shown (the re-ranker's answer after a re-ranker).
    vote_ : object or None
        The first stage's answer (``vote_label``) of an explanation with a
        re-ranker; None otherwise.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from sklearn.datasets import load_digits
    >>> from skmml import ExplanationDisplay, KNNVoteClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = KNNVoteClassifier(n_neighbors=32).fit(X[:1000], y[:1000])
    >>> images = load_digits().images[:1000]          # row i is memory id i
    >>> display = ExplanationDisplay.from_estimator(
    ...     clf, X[1000:1001], images=images, query_image=load_digits().images[1000])
    >>> [ax.get_title().split("\\n")[0] for ax in display.axes_][:3]
    ['query', '#0 label 1', '#1 label 1']
    >>> print(len(display.axes_), display.prediction_)   # the query, 10 of 32 neighbors
    11 1
    """

    def __init__(self, explanation, *, images=None, query_image=None, title=None,
                 max_neighbors=10, prediction=None):
        self.explanation = explanation
        self.images = images
        self.query_image = query_image
        self.title = title
        self.max_neighbors = max_neighbors
        self.prediction = prediction

    @classmethod
    def from_estimator(cls, estimator, X, *, query=0, images=None, query_image=None,
                       title=None, max_neighbors=10, ax=None):
        """Explain one query of `X` with `estimator` and plot it.

        Parameters
        ----------
        estimator : KNNVoteClassifier, MemoryModularClassifier or Pipeline
            A fitted classifier with an ``explain`` method, or a pipeline
            ending in one: the earlier steps transform the query (e.g. encode
            an image file) before it is explained.
        X : array-like, list, pandas Series or DataFrame
            Queries: embeddings, or the pipeline's raw inputs (file paths,
            PIL images, uint8 image arrays).
        query : int, default=0
            Row of `X` to explain.
        images, query_image, title, max_neighbors
            See the class parameters. A raw image query (a file path, a PIL
            image or a uint8 array) is its own query image.
        ax : matplotlib Axes, default=None
            Where to draw; None makes a new figure.

        Returns
        -------
        display : ExplanationDisplay
            ``prediction_`` is ``estimator.predict`` on the query (read from
            the explanation after a re-ranker, which is not asked twice).
        """
        one = _safe_indexing(X, [query])
        classifier, transformed = _final_step(estimator, one)
        if not hasattr(classifier, "explain"):
            raise TypeError(f"{type(classifier).__name__} has no explain method; pass a "
                            "skmml classifier or a pipeline ending in one.")
        explanation = classifier.explain(transformed)
        if query_image is None:
            query_image = _as_image(_first(one))
        prediction = (explanation["reranked_label"].iloc[0] if "reranked_label" in explanation
                      else estimator.predict(one)[0])
        return cls.from_explanation(explanation, images=images, query_image=query_image,
                                    title=title, max_neighbors=max_neighbors,
                                    prediction=prediction, ax=ax)

    @classmethod
    def from_explanation(cls, explanation, *, query=None, images=None, query_image=None,
                         title=None, max_neighbors=10, prediction=None, ax=None):
        """Plot the explanation of one query.

        Parameters
        ----------
        explanation : pandas.DataFrame
            The output of ``explain``.
        query : int, default=None
            Which query's rows to plot (the ``query`` column); None needs an
            explanation of one query.
        images, query_image, title, max_neighbors, prediction
            See the class parameters. A None `prediction` is the class with
            the largest summed weight, which is what a vote gives.
        ax : matplotlib Axes, default=None
            Where to draw; None makes a new figure.

        Returns
        -------
        display : ExplanationDisplay
        """
        if not isinstance(explanation, pd.DataFrame) or "rank" not in explanation:
            raise TypeError("explanation must be the DataFrame returned by explain().")
        queries = explanation["query"].unique()
        if query is None:
            if len(queries) != 1:
                raise ValueError(
                    f"The explanation holds {len(queries)} queries; pass query= to pick one."
                )
            query = queries[0]
        rows = explanation[explanation["query"] == query]
        if rows.empty:
            raise ValueError(f"The explanation has no rows for query {query!r}.")
        return cls(rows, images=images, query_image=query_image, title=title,
                   max_neighbors=max_neighbors, prediction=prediction).plot(ax=ax)

    # -- drawing -------------------------------------------------------------------------

    def plot(self, ax=None):
        """Draw the display.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw (image panels are laid out inside it); None makes a
            new figure sized to the panel grid.

        Returns
        -------
        self : ExplanationDisplay
        """
        import matplotlib.pyplot as plt

        limit = self.max_neighbors
        if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
            raise ValueError(f"max_neighbors must be None or an int >= 1, got {limit!r}.")
        rows = self.explanation
        two_stages = "reranked_label" in rows
        self.vote_ = rows["vote_label"].iloc[0] if two_stages else None
        self.prediction_ = self.prediction
        if self.prediction_ is None:
            self.prediction_ = (rows["reranked_label"].iloc[0] if two_stages  # the answer
                                else rows.groupby("label")["weight"].sum().idxmax())  # a vote's
        source = self._image_source(rows)
        if source is None:
            if ax is None:
                _, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
            self.figure_, self.ax_ = ax.figure, ax
            self._plot_votes(ax, rows)
        else:
            several = "modality" in rows and rows["modality"].nunique() > 1
            blocks = [(branch if several else None, part.sort_values("rank"))
                      for branch, part in (rows.groupby("modality", sort=False)
                                           if several else [(None, rows)])]
            top = _TOP_TITLE if self.title else 0.0
            layout = _Grid([len(part) if limit is None else min(limit, len(part))
                            for _, part in blocks])
            if ax is None:
                fig = plt.figure(figsize=(layout.width, layout.height + top))
                ax = fig.add_axes((0, 0, 1, layout.height / (layout.height + top)))
            self.figure_, self.ax_ = ax.figure, ax
            self._plot_images(ax, blocks, source, layout)
        if self.title:  # inside the figure: a plain savefig keeps it
            figure = self.figure_
            where = ({} if figure.get_layout_engine() is not None  # placed by the layout
                     else {"y": 1 - 0.08 / figure.get_figheight(), "va": "top"})
            figure.suptitle(self.title, fontsize=11, **where)
        return self

    def _image_source(self, rows):
        """A function id -> image, or None when there are no images to show."""
        images = self.images
        if images is None:
            images = "source" if "source" in rows else None
        if images is None:
            return None
        if isinstance(images, str):
            if images not in rows:
                raise ValueError(f"The explanation has no metadata column {images!r}.")
            by_id = {item: value for item, value in zip(rows["id"], rows[images])
                     if not _missing(value)}  # e.g. text rows
            return lambda item: by_id[item]
        return lambda item: images[item]

    def _query_title(self):
        """The query panel's title: the prediction, or both stages' answers."""
        if self.vote_ is None:
            return f"query\npredicted: {self.prediction_}"
        title = f"query\nvote: {_short(self.vote_, 8)} / reranked: {_short(self.prediction_, 8)}"
        fallback = self.explanation.get("rerank_fallback")
        if fallback is not None and not _missing(fallback.iloc[0]):
            title += f"\n(fell back: {fallback.iloc[0]})"
        return title

    def _plot_votes(self, ax, rows):
        votes = rows.groupby("label", sort=True)["weight"].sum()
        bars = ax.bar([str(label) for label in votes.index], votes.to_numpy(), color="C0")
        ax.bar_label(bars, fmt="%.2f")
        ax.margins(y=0.15)  # room for the labels below the title
        ax.set_xlabel("class")
        ax.set_ylabel("summed weight")
        answer = (f"predicted: {self.prediction_}" if self.vote_ is None
                  else f"vote: {self.vote_}, reranked: {self.prediction_}")
        ax.set_title(f"Weights of the {len(rows)} retrieved items per class; {answer}",
                     fontsize=10)
        self.axes_ = [ax]

    def _plot_images(self, ax, blocks, source, layout):
        ax.axis("off")
        query_image = self.query_image
        if query_image is None and "query_source" in self.explanation:
            known = [v for v in self.explanation["query_source"] if not _missing(v)]
            query_image = known[0] if known else None
        query_panel = ax.inset_axes(layout.panel(0, 0))
        _show(query_panel, query_image)
        query_panel.set_title(self._query_title(), fontsize=_FONT, fontweight="bold")
        self.axes_ = [query_panel]
        for b, (branch, part) in enumerate(blocks):
            shown = layout.counts[b]
            x, y = layout.header(b)
            count = (f"{shown} of {len(part)} neighbors shown" if shown < len(part)
                     else f"all {shown} neighbors")
            header = count if branch is None else f"{branch} memory: {count}"
            ax.text(x, y, header, transform=ax.transAxes, ha="left", va="center",
                    fontsize=_FONT + 1, fontweight="bold")
            for c, item in enumerate(part.head(shown).to_dict("records")):
                panel = ax.inset_axes(layout.panel(b, c + (b == 0)))
                image = None
                if item.get("modality") != "text":  # a text item has no image
                    try:
                        image = source(item["id"])
                    except (KeyError, IndexError):
                        pass
                _show(panel, image, item.get("text") if image is None else None)
                name = f"#{int(item['rank'])} label {_short(item['label'])}"
                if branch is not None:
                    name = f"{branch} {name}"
                panel.set_title(f"{name}\ncos {item['similarity']:.2f}\n"
                                f"weight {item['weight']:.2f}", fontsize=_FONT)
                self.axes_.append(panel)


class _Grid:
    """Panel positions, in axes fractions, of blocks of at most six columns.

    Block ``b`` holds ``counts[b]`` neighbors (and the query first in block
    0), wrapping onto new rows; sizes are in inches, so a figure of
    ``width`` x ``height`` shows every panel at the same readable size.
    """

    def __init__(self, counts):
        self.counts = counts
        cells = [n + (b == 0) for b, n in enumerate(counts)]
        self.columns = min(_MAX_COLUMNS, max(cells))
        self.rows = [math.ceil(n / self.columns) for n in cells]
        row_height = _TITLE_HEIGHT + _IMAGE_SIZE
        # Inches from the top at which each block starts.
        self.starts = np.cumsum([0] + [_HEADER_HEIGHT + r * row_height for r in self.rows])
        self.width = 2 * _MARGIN + self.columns * _CELL_WIDTH
        self.height = self.starts[-1] + _MARGIN

    def header(self, block):
        """The (x, y) of a block's header line."""
        return _MARGIN / self.width, 1 - (self.starts[block] + _HEADER_HEIGHT / 2) / self.height

    def panel(self, block, cell):
        """The [x0, y0, width, height] of a block's cell (row-major)."""
        row, column = divmod(cell, self.columns)
        top = (self.starts[block] + _HEADER_HEIGHT + row * (_TITLE_HEIGHT + _IMAGE_SIZE)
               + _TITLE_HEIGHT)
        x0 = _MARGIN + column * _CELL_WIDTH + (_CELL_WIDTH - _IMAGE_SIZE) / 2
        return [x0 / self.width, 1 - (top + _IMAGE_SIZE) / self.height,
                _IMAGE_SIZE / self.width, _IMAGE_SIZE / self.height]


def _final_step(estimator, X):
    """(classifier, X transformed by the steps before it) of an estimator or pipeline."""
    from sklearn.pipeline import Pipeline

    steps = getattr(estimator, "steps", None)
    if not steps:
        return estimator, X
    if isinstance(estimator, Pipeline):
        if len(steps) > 1:
            X = estimator[:-1].transform(X)
    else:  # anything else with steps, e.g. imblearn's Pipeline
        for _, step in steps[:-1]:
            if step is not None and not (isinstance(step, str) and step == "passthrough"):
                X = step.transform(X)
    return _final_step(steps[-1][1], X)


def _first(one):
    """The single element of a one-row selection (list, array, Series, DataFrame)."""
    if isinstance(one, pd.DataFrame):
        return one.iloc[0, 0] if one.shape[1] == 1 else None
    if isinstance(one, pd.Series):
        return one.iloc[0]
    return one[0]


def _as_image(item):
    """`item` when a raw query is an image (a path, a PIL image, a uint8 array), else None."""
    if isinstance(item, (str, Path)):
        return item if Path(item).suffix.lower() in IMAGE_EXTENSIONS else None
    if hasattr(item, "getpixel"):  # a PIL image
        return np.asarray(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and (
            item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (3, 4))):
        return item
    return None


def _missing(value):
    return value is None or (isinstance(value, float) and np.isnan(value))


def _short(label, width=16):
    label = str(label)
    return label if len(label) <= width else label[:width - 1] + "…"


def _show(ax, image, text=None):
    """Draw an image (array or file path), a text, or an empty frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as opened:
            image = np.asarray(opened.convert("RGB"))
    if image is not None:
        image = np.asarray(image)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    elif text is not None:
        lines = textwrap.wrap(str(text), 20)[:7]
        ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=_FONT)
