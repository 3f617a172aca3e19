import matplotlib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from skmml import ExplanationDisplay, KNNVoteClassifier, Memory, MemoryModularClassifier

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
    assert titles[0] == "query" and len(titles) == 7
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
