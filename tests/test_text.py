import pytest

from skmml.memory import IMAGENET_TEMPLATES, fill_templates, split_document


def test_templates_are_clips_80():
    open_clip = pytest.importorskip("open_clip.zero_shot_metadata")
    assert len(IMAGENET_TEMPLATES) == 80
    assert fill_templates("tench") == [t("tench") for t in
                                       open_clip.OPENAI_IMAGENET_TEMPLATES]


def test_sentences_sections_and_truncation():
    doc = "\n".join([
        "The tench (Tinca tinca) is a fish. It is found in Europe! Is it green? Yes.",
        "",
        "== Description ==",
        "It has small scales. " + " ".join(f"W{i}" for i in range(100)) + ".",
        "== External links ==",
        "Tench at FishBase.",
        "=== More links ===",
        "Another link.",
        "== Ecology ==",
        'He said "it is slow." Then it left.',
        "Further reading",
        "A. Author (2000). Fish.",
    ])
    sentences = split_document(doc)
    assert sentences[:4] == ["The tench (Tinca tinca) is a fish.", "It is found in Europe!",
                             "Is it green?", "Yes."]
    assert sentences[4] == "It has small scales."
    assert len(sentences[5].split()) == 75 and sentences[5].startswith("W0 W1")
    assert sentences[6:] == ['He said "it is slow."', "Then it left."]
    assert split_document("one two three.", max_words=2) == ["one two"]


def test_bad_input():
    with pytest.raises(TypeError, match="needs a str"):
        split_document(["a list"])
    with pytest.raises(ValueError, match="max_words"):
        split_document("a", max_words=0)
    with pytest.raises(TypeError, match="class_name must be a str"):
        fill_templates(3)
