"""ExplanationDisplay: a decision explained as a picture of the memory items behind it."""

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd


class ExplanationDisplay:
    """The query and its retrieved memory items: image, label, similarity, vote.

    Built from a classifier (:meth:`from_estimator`) or from the DataFrame of
    its ``explain`` (:meth:`from_explanation`), as scikit-learn's displays
    are. With images, :meth:`plot` draws the query and then its neighbors in
    rank order, each titled with its label, cosine similarity and weight
    (the vote of :class:`~skmml.KNNVoteClassifier`, or the attention of
    :class:`~skmml.MemoryModularClassifier`, one row of panels per modality;
    a text item shows its text). Without images it draws a bar chart of the
    weights per class.

    Parameters
    ----------
    explanation : pandas.DataFrame
        The rows of *one* query from ``explain``: ``modality``, ``rank``,
        ``id``, ``label``, ``similarity`` and ``weight``, then metadata
        columns.
    images : None, str, mapping or array-like, default=None
        The memory items' images: a mapping or array indexed by memory id
        (e.g. the array the memory was built from, when its ids are its
        rows), or the name of a metadata column of file paths or arrays.
        None uses the metadata column ``"source"`` (set by
        :meth:`~skmml.Memory.from_folder`) when there is one.
    query_image : None, path or array, default=None
        The query's image, drawn first.
    title : str, default=None
        Figure title.

    Attributes
    ----------
    figure_ : matplotlib.figure.Figure
    ax_ : matplotlib.axes.Axes
        The axes the display was drawn in.
    axes_ : list of matplotlib.axes.Axes
        One panel per image (query first), or ``[ax_]`` for the bar chart.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from sklearn.datasets import load_digits
    >>> from skmml import ExplanationDisplay, KNNVoteClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> clf = KNNVoteClassifier(n_neighbors=5).fit(X[:1000], y[:1000])
    >>> images = load_digits().images[:1000]          # row i is memory id i
    >>> display = ExplanationDisplay.from_estimator(
    ...     clf, X[1000:1001], images=images, query_image=load_digits().images[1000])
    >>> [ax.get_title().split("\\n")[0] for ax in display.axes_][:3]
    ['query', '#0 label 1', '#1 label 1']
    """

    def __init__(self, explanation, *, images=None, query_image=None, title=None):
        self.explanation = explanation
        self.images = images
        self.query_image = query_image
        self.title = title

    @classmethod
    def from_estimator(cls, estimator, X, *, query=0, images=None, query_image=None,
                       title=None, ax=None):
        """Explain one query of `X` with `estimator` and plot it.

        Parameters
        ----------
        estimator : KNNVoteClassifier or MemoryModularClassifier
            A fitted classifier with an ``explain`` method.
        X : array-like of shape (n_queries, n_features)
            Query embeddings.
        query : int, default=0
            Row of `X` to explain.
        images, query_image, title
            See the class parameters.
        ax : matplotlib Axes, default=None
            Where to draw; None makes a new figure.

        Returns
        -------
        display : ExplanationDisplay
        """
        X = np.asarray(X)
        explanation = estimator.explain(X[query:query + 1])
        return cls.from_explanation(explanation, images=images, query_image=query_image,
                                    title=title, ax=ax)

    @classmethod
    def from_explanation(cls, explanation, *, query=None, images=None, query_image=None,
                         title=None, ax=None):
        """Plot the explanation of one query.

        Parameters
        ----------
        explanation : pandas.DataFrame
            The output of ``explain``.
        query : int, default=None
            Which query's rows to plot (the ``query`` column); None needs an
            explanation of one query.
        images, query_image, title, ax
            See :meth:`from_estimator`.

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
        return cls(rows, images=images, query_image=query_image, title=title).plot(ax=ax)

    # -- drawing -------------------------------------------------------------------------

    def plot(self, ax=None):
        """Draw the display.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw (image panels are laid out inside it); None makes a
            new figure.

        Returns
        -------
        self : ExplanationDisplay
        """
        import matplotlib.pyplot as plt

        rows = self.explanation
        value = "weight"
        source = self._image_source(rows)
        several = "modality" in rows and rows["modality"].nunique() > 1
        branches = list(rows["modality"].unique()) if several else [None]
        k = int(rows.groupby("modality")["rank"].count().max()) if several else len(rows)
        if ax is None:
            if source is None:
                fig, ax = plt.subplots(figsize=(6, 3.5))
            else:
                fig, ax = plt.subplots(figsize=(1.3 * (k + 1), 1.9 * len(branches)))
        self.figure_, self.ax_ = ax.figure, ax
        if source is None:
            self._plot_votes(ax, rows, value)
        else:
            self._plot_images(ax, rows, value, source, branches, k)
        if self.title:
            # Above the panels' own titles (saved whole with bbox_inches="tight").
            self.figure_.suptitle(self.title, y=1.0 if source is None else 1.12,
                                  va="bottom" if source is not None else "top")
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
                     if not (isinstance(value, float) and np.isnan(value))}  # e.g. text rows
            return lambda item: by_id[item]
        return lambda item: images[item]

    def _plot_votes(self, ax, rows, value):
        votes = rows.groupby("label", sort=True)[value].sum()
        bars = ax.bar([str(label) for label in votes.index], votes.to_numpy(), color="C0")
        ax.bar_label(bars, fmt="%.2f")
        ax.set_xlabel("class")
        ax.set_ylabel(f"summed {value}")
        ax.set_title(f"Weights of the {len(rows)} retrieved items per class")
        self.axes_ = [ax]

    def _plot_images(self, ax, rows, value, source, branches, k):
        ax.axis("off")
        n_cols, n_rows = k + 1, len(branches)
        self.axes_ = []
        query_panel = ax.inset_axes([0, 1 - 1 / n_rows, 1 / n_cols, 1 / n_rows])
        _show(query_panel, self.query_image)
        query_panel.set_title("query", fontsize=8)
        self.axes_.append(query_panel)
        for r, branch in enumerate(branches):
            part = rows if branch is None else rows[rows["modality"] == branch]
            for c, item in enumerate(part.sort_values("rank").to_dict("records")):
                panel = ax.inset_axes([(c + 1) / n_cols, 1 - (r + 1) / n_rows,
                                       1 / n_cols, 1 / n_rows])
                try:
                    image = source(item["id"])
                except (KeyError, IndexError):
                    image = None
                text = item.get("text") if image is None else None
                _show(panel, image, text)
                name = f"#{int(item['rank'])} label {item['label']}"
                if branch is not None:
                    name = f"{branch} {name}"
                panel.set_title(f"{name}\ncos {item['similarity']:.2f}\n"
                                f"{value} {item[value]:.2f}", fontsize=7)
                self.axes_.append(panel)


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
        lines = textwrap.wrap(str(text), 18)[:6]
        ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center",
                fontsize=6, wrap=True)
