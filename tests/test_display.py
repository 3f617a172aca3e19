import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from skmml import ExplanationDisplay, KNNVoteClassifier, Memory, MemoryModularClassifier
from skmml._display import _final_step

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.data.astype(np.float32), data.target, data.images


def _titles(display):
    return [ax.get_title() for ax in display.axes_]


def test_images_by_id_show_the_query_then_the_neighbors_in_rank_order(digits):
    X, y, images = digits
    clf = KNNVoteClassifier(n_neighbors=6).fit(X[:1000], y[:1000])
    display = ExplanationDisplay.from_estimator(clf, X[1000:1003], query=2, images=images,
                                                query_image=images[1002], title="why")
    table = clf.explain(X[1002:1003])
    titles = _titles(display)
    assert titles[0] == f"query\npredicted: {clf.predict(X[1002:1003])[0]}" and len(titles) == 7
    for title, row in zip(titles[1:], table.to_dict("records")):
        assert title == (f"#{row['rank']} label {row['label']}\ncos {row['similarity']:.2f}\n"
                         f"weight {row['weight']:.2f}")
    # Each panel shows the image of the neighbor with that id.
    for panel, item in zip(display.axes_[1:], table["id"]):
        np.testing.assert_array_equal(panel.get_images()[0].get_array(), images[item])
    assert display.figure_._suptitle.get_text() == "why"


def test_file_paths_in_metadata_are_loaded(digits, tmp_path):
    X, y, images = digits
    paths = []
    for i in range(60):
        path = tmp_path / f"{i}.png"
        Image.fromarray((images[i] * 15).astype(np.uint8)).save(path)
        paths.append(str(path))
    memory = Memory(X[:60], y[:60], image_metadata={"source": paths})
    clf = KNNVoteClassifier(n_neighbors=3).set_memory(memory)
    display = ExplanationDisplay.from_estimator(clf, X[60:61])
    ids = clf.explain(X[60:61])["id"].tolist()
    for panel, item in zip(display.axes_[1:], ids):
        shown = panel.get_images()[0].get_array()
        np.testing.assert_array_equal(shown[..., 0], (images[item] * 15).astype(np.uint8))


def test_without_images_a_bar_chart_of_votes_per_class(digits):
    X, y, _ = digits
    clf = KNNVoteClassifier(n_neighbors=8).fit(X[:1000], y[:1000])
    table = clf.explain(X[1000:1002])
    display = ExplanationDisplay.from_explanation(table, query=1)
    bars = display.ax_.patches
    votes = table[table["query"] == 1].groupby("label")["weight"].sum()
    assert [b.get_height() for b in bars] == pytest.approx(votes.to_list())
    assert [t.get_text() for t in display.ax_.get_xticklabels()] == [str(c) for c in votes.index]


def test_mml_shows_each_branch_with_attention_and_text_items():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    img_y, txt_y = np.repeat(np.arange(3), 10), np.repeat(np.arange(3), 3)
    memory = Memory(centres[img_y] + rng.normal(size=(30, 8)), img_y,
                    text_embeddings=centres[txt_y] + rng.normal(size=(9, 8)), text_labels=txt_y,
                    text_metadata={"text": [f"a sentence about class {c}" for c in txt_y]})
    X = (centres[img_y] + rng.normal(size=(30, 8))).astype(np.float32)
    clf = MemoryModularClassifier(n_neighbors=3, max_epochs=1, validation_fraction=None,
                                  memory=memory, random_state=0).fit(X, img_y)
    pictures = rng.integers(0, 255, size=(30, 4, 4))
    display = ExplanationDisplay.from_estimator(clf, X[:1], images=pictures)
    titles = _titles(display)
    assert sum(t.startswith("image #") for t in titles) == 3
    assert sum(t.startswith("text #") for t in titles) == 3
    assert all("weight" in t for t in titles[1:])
    texts = [t.get_text() for ax in display.axes_ for t in ax.texts]
    assert sum("sentence about" in t for t in texts) == 3


def test_errors(digits):
    X, y, _ = digits
    clf = KNNVoteClassifier(n_neighbors=3).fit(X[:100], y[:100])
    table = clf.explain(X[100:102])
    with pytest.raises(ValueError, match="holds 2 queries; pass query="):
        ExplanationDisplay.from_explanation(table)
    with pytest.raises(TypeError, match="DataFrame returned by explain"):
        ExplanationDisplay.from_explanation(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="no metadata column 'path'"):
        ExplanationDisplay.from_explanation(table, query=0, images="path")


def test_mml_explanation_with_image_files_and_text_items(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 8))
    img_y, txt_y = np.repeat(np.arange(2), 5), np.array([0, 1])
    paths = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    memory = Memory(centres[img_y] + rng.normal(size=(10, 8)), img_y,
                    text_embeddings=centres[txt_y], text_labels=txt_y,
                    image_metadata={"source": paths}, text_metadata={"text": ["zero", "one"]})
    X = (centres[img_y] + rng.normal(size=(10, 8))).astype(np.float32)
    clf = MemoryModularClassifier(n_neighbors=2, max_epochs=0, memory=memory).fit(X, img_y)
    display = ExplanationDisplay.from_estimator(clf, X[:1])  # images from "source"
    assert sum(len(ax.get_images()) for ax in display.axes_[1:]) == 2  # the image branch
    assert sum(len(ax.texts) for ax in display.axes_[1:]) == 2  # the text branch


# -- a readable grid at large k ------------------------------------------------------


def _grid(display):
    """(columns, rows) of the panels, from their positions in the figure."""
    boxes = np.array([ax.get_position().bounds for ax in display.axes_])
    return len(np.unique(boxes[:, 0].round(3))), len(np.unique(boxes[:, 1].round(3)))


def _headers(display):
    return [t.get_text() for t in display.ax_.texts]


def _assert_readable(display):
    width, height = display.figure_.get_size_inches()
    assert width <= 12 and height <= 12
    for ax in display.axes_:
        assert ax.title.get_fontsize() >= 8
        assert all(t.get_fontsize() >= 8 for t in ax.texts)
        w, h = ax.get_position().size * (width, height)
        assert 1.0 <= w <= 1.8 and 1.0 <= h <= 1.8  # inches per panel


def _mml(n_neighbors=32, n_texts=40):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    img_y, txt_y = np.repeat(np.arange(3), 20), np.arange(n_texts) % 3
    memory = Memory(centres[img_y] + rng.normal(size=(60, 8)), img_y,
                    text_embeddings=centres[txt_y] + rng.normal(size=(n_texts, 8)),
                    text_labels=txt_y, text_metadata={"text": [f"class {c}" for c in txt_y]})
    X = (centres[img_y] + rng.normal(size=(60, 8))).astype(np.float32)
    clf = MemoryModularClassifier(n_neighbors=n_neighbors, max_epochs=1,
                                  validation_fraction=None, memory=memory,
                                  random_state=0).fit(X, img_y)
    return clf, X, rng.integers(0, 255, size=(60, 4, 4))


def test_knn_at_k32_draws_ten_neighbors_in_a_grid(digits):
    X, y, images = digits
    clf = KNNVoteClassifier(n_neighbors=32).fit(X[:1000], y[:1000])
    display = ExplanationDisplay.from_estimator(clf, X[1000:1001], images=images)
    table = clf.explain(X[1000:1001])
    assert len(display.axes_) == 11 and _grid(display) == (6, 2)
    assert _headers(display) == ["10 of 32 neighbors shown"]
    # The highest-ranked ones, in rank order.
    for panel, item in zip(display.axes_[1:], table["id"][:10]):
        np.testing.assert_array_equal(panel.get_images()[0].get_array(), images[item])
    _assert_readable(display)

    everything = ExplanationDisplay.from_estimator(clf, X[1000:1001], images=images,
                                                   max_neighbors=None)
    assert len(everything.axes_) == 33 and _grid(everything) == (6, 6)
    assert _headers(everything) == ["all 32 neighbors"]
    few = ExplanationDisplay.from_estimator(clf, X[1000:1001], images=images, max_neighbors=3)
    assert len(few.axes_) == 4 and _grid(few) == (4, 1)
    with pytest.raises(ValueError, match="max_neighbors must be None or an int >= 1"):
        ExplanationDisplay.from_estimator(clf, X[1000:1001], images=images, max_neighbors=0)


def test_mml_at_k32_one_labelled_block_per_modality():
    clf, X, pictures = _mml()
    display = ExplanationDisplay.from_estimator(clf, X[:1], images=pictures)
    titles = _titles(display)
    assert len(titles) == 21 and _grid(display) == (6, 4)
    assert sum(t.startswith("image #") for t in titles) == 10
    assert sum(t.startswith("text #") for t in titles) == 10
    assert _headers(display) == ["image memory: 10 of 32 neighbors shown",
                                 "text memory: 10 of 32 neighbors shown"]
    # The image block's rows lie above the text block's.
    tops = [ax.get_position().y1 for ax in display.axes_]
    image_rows = [y for y, t in zip(tops, titles) if t.startswith(("query", "image"))]
    text_rows = [y for y, t in zip(tops, titles) if t.startswith("text")]
    assert min(image_rows) > max(text_rows)
    # Text items show their text, never an image looked up by their id.
    texts = [ax for ax, t in zip(display.axes_, titles) if t.startswith("text")]
    assert all(not ax.get_images() and "class" in ax.texts[0].get_text() for ax in texts)
    _assert_readable(display)


def test_title_is_inside_the_figure_on_a_plain_savefig(digits, tmp_path):
    X, y, images = digits
    clf = KNNVoteClassifier(n_neighbors=32).fit(X[:1000], y[:1000])
    for kwargs in ({"images": images}, {}):  # the panel grid, then the bar chart
        display = ExplanationDisplay.from_estimator(clf, X[1000:1001], title="Why 1?",
                                                    **kwargs)
        figure = display.figure_
        figure.savefig(tmp_path / "plain.png")
        renderer = figure.canvas.get_renderer()
        box = figure._suptitle.get_window_extent(renderer)
        assert figure._suptitle.get_text() == "Why 1?"
        assert (box.x0 >= figure.bbox.x0 and box.x1 <= figure.bbox.x1
                and box.y0 >= figure.bbox.y0 and box.y1 <= figure.bbox.y1)
        # Above every panel's title and header, not over them.
        below = [ax.title for ax in display.axes_] + list(display.ax_.texts)
        assert all(box.y0 >= t.get_window_extent(renderer).y1 for t in below)


# -- the query panel: its image and the prediction -----------------------------------


def _png_files(images, folder):
    paths = []
    for i, image in enumerate(images):
        Image.fromarray((image * 15).astype(np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def _read_flat(paths):  # a list, Series or one-column DataFrame of paths
    return np.stack([np.asarray(Image.open(p), dtype=np.float32).ravel()
                     for p in np.asarray(paths, dtype=object).ravel()])


def test_pipeline_on_raw_paths_fills_the_query_panel(digits, tmp_path):
    _, y, images = digits
    paths = _png_files(images[:300], tmp_path)
    pipe = make_pipeline(FunctionTransformer(_read_flat), KNNVoteClassifier(n_neighbors=32))
    pipe.fit(paths[:250], y[:250])
    for X in (paths, pd.Series(paths), pd.DataFrame({"path": paths})):
        display = ExplanationDisplay.from_estimator(pipe, X, query=260, images=images)
        query = display.axes_[0].get_images()[0].get_array()
        np.testing.assert_array_equal(query[..., 0], (images[260] * 15).astype(np.uint8))
        predicted = pipe.predict(paths[260:261])[0]
        assert display.prediction_ == predicted
        assert display.axes_[0].get_title() == f"query\npredicted: {predicted}"
        table = pipe[-1].explain(_read_flat(paths[260:261]))
        assert [ax.get_title().split("\n")[0] for ax in display.axes_[1:]] == [
            f"#{r} label {label}" for r, label in zip(table["rank"][:10], table["label"][:10])]


def test_pipeline_on_raw_uint8_images(digits):
    X, y, images = digits
    raw = (images * 15).astype(np.uint8)
    flatten = FunctionTransformer(lambda a: np.reshape(a, (len(a), -1)).astype(np.float32))
    pipe = make_pipeline(flatten, KNNVoteClassifier(n_neighbors=32)).fit(raw[:1000], y[:1000])
    display = ExplanationDisplay.from_estimator(pipe, raw, query=1005, images=raw)
    np.testing.assert_array_equal(display.axes_[0].get_images()[0].get_array(), raw[1005])
    assert display.prediction_ == pipe.predict(raw[1005:1006])[0]
    assert len(display.axes_) == 11
    # Embeddings are not images: the query panel stays an empty, labelled box.
    plain = ExplanationDisplay.from_estimator(pipe[-1], X, query=1005, images=raw)
    assert not plain.axes_[0].get_images()
    assert plain.axes_[0].get_title().startswith("query\npredicted: ")


def test_final_step_of_estimators_and_pipelines():
    X = np.arange(6.0).reshape(3, 2)
    clf = KNNVoteClassifier()
    assert _final_step(clf, X) == (clf, X)
    double = FunctionTransformer(lambda a: 2 * a)
    last, Xt = _final_step(make_pipeline(double, make_pipeline(double, clf)), X)
    assert last is clf
    np.testing.assert_array_equal(Xt, 4 * X)

    class Steps:  # anything with steps, e.g. imblearn's Pipeline
        steps = [("double", double), ("skip", "passthrough"), ("clf", clf)]

    last, Xt = _final_step(Steps(), X)
    assert last is clf
    np.testing.assert_array_equal(Xt, 2 * X)
    with pytest.raises(TypeError, match="has no explain method"):
        ExplanationDisplay.from_estimator(make_pipeline(double), X)


def test_from_explanation_prediction_and_query_source(digits, tmp_path):
    X, y, images = digits
    clf = KNNVoteClassifier(n_neighbors=8).fit(X[:1000], y[:1000])
    table = clf.explain(X[1000:1001])
    display = ExplanationDisplay.from_explanation(table, images=images)
    votes = table.groupby("label")["weight"].sum()
    assert display.prediction_ == votes.idxmax() == clf.predict(X[1000:1001])[0]
    assert display.axes_[0].get_title() == f"query\npredicted: {votes.idxmax()}"
    assert not display.axes_[0].get_images()  # nothing to show: an empty, labelled box
    given = ExplanationDisplay.from_explanation(table, images=images, prediction="seven")
    assert given.prediction_ == "seven" and given.axes_[0].get_title().endswith("seven")
    (path,) = _png_files(images[1000:1001], tmp_path)
    with_source = ExplanationDisplay.from_explanation(table.assign(query_source=path),
                                                      images=images)
    shown = with_source.axes_[0].get_images()[0].get_array()
    np.testing.assert_array_equal(shown[..., 0], (images[1000] * 15).astype(np.uint8))
    bars = ExplanationDisplay.from_explanation(table)
    assert bars.ax_.get_title().endswith(f"predicted: {votes.idxmax()}")


class _AlwaysFive:
    """A re-ranker that answers 5, or raises; counts its calls."""

    batch_size = None

    def __init__(self, fail=False):
        self.fail = fail
        self.calls = 0

    def rerank(self, context):
        self.calls += 1
        if self.fail:
            raise RuntimeError("no model")
        return np.full(context.n_queries, 5)


def test_both_stages_in_the_query_title(digits):
    import matplotlib.pyplot as plt

    from skmml import RerankFallbackWarning

    plt.close("all")  # the figures of the tests before
    X, y, images = digits
    query = X[1000:1001]  # a 1: the vote says 1, the re-ranker 5
    reranker = _AlwaysFive()
    clf = KNNVoteClassifier(n_neighbors=6, reranker=reranker).fit(X[:1000], y[:1000])
    display = ExplanationDisplay.from_estimator(clf, query, images=images)
    assert _titles(display)[0] == "query\nvote: 1 / reranked: 5"
    assert (display.vote_, display.prediction_) == (1, 5)
    assert reranker.calls == 1  # the answer is read from the explanation, not asked again
    bars = ExplanationDisplay.from_explanation(clf.explain(query))
    assert bars.ax_.get_title().endswith("; vote: 1, reranked: 5")
    clf.set_params(reranker=_AlwaysFive(fail=True))
    with pytest.warns(RerankFallbackWarning):
        display = ExplanationDisplay.from_estimator(clf, query, images=images)
    assert _titles(display)[0] == "query\nvote: 1 / reranked: 1\n(fell back: error)"
    plain = ExplanationDisplay.from_estimator(clf.set_params(reranker=None), query,
                                              images=images)
    assert _titles(plain)[0] == "query\npredicted: 1" and plain.vote_ is None
    plt.close("all")
