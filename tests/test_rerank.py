"""Re-ranking, the visual memory's second stage: the protocol, EmbeddingReranker, VLMReranker.

The VLM path runs end to end on a tiny randomly initialised LLaVA (CLIP
vision tower, Llama text model) with a word-level tokenizer trained here:
nothing is downloaded.
"""

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.utils._param_validation import InvalidParameterError

from skmml import (BaseReranker, EmbeddingReranker, KNNVoteClassifier, RerankContext,
                   RerankFallbackWarning, VLMReranker)
from skmml.encoders import Embeddings
from skmml.neighbors._rerank import FALLBACK_REASONS

N_MEMORY, N_QUERIES = 120, 12


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.data.astype(np.float32), data.target, data.images


@pytest.fixture(scope="module")
def files(digits, tmp_path_factory):
    """PNG files of the first memory and query digits: (memory paths, query paths)."""
    _, _, images = digits
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i in range(N_MEMORY + N_QUERIES):
        path = folder / f"{i}.png"
        Image.fromarray((images[i] * 15).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths[:N_MEMORY], paths[N_MEMORY:]


@pytest.fixture(scope="module")
def encoded(digits, files):
    """Memory and query embeddings that remember their files, as an encoder gives them."""
    X, y, _ = digits
    memory_paths, query_paths = files
    return (Embeddings(X[:N_MEMORY], memory_paths), y[:N_MEMORY],
            Embeddings(X[N_MEMORY:N_MEMORY + N_QUERIES], query_paths),
            y[N_MEMORY:N_MEMORY + N_QUERIES])


class Recorder(BaseReranker):
    """Answers with `answer(context)` (default: the vote's scores); keeps every context."""

    def __init__(self, answer=None, batch_size=None):
        self.answer = answer
        self.batch_size = batch_size

    def rerank(self, context):
        self.__dict__.setdefault("contexts", []).append(context)
        return context.vote_proba if self.answer is None else self.answer(context)


def _quiet(call, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RerankFallbackWarning)
        return call(*args)


# -- the protocol --------------------------------------------------------------------------


def test_a_reranker_that_returns_the_vote_changes_nothing(digits):
    X, y, _ = digits
    plain = KNNVoteClassifier(n_neighbors=7).fit(X[:500], y[:500])
    both = KNNVoteClassifier(n_neighbors=7, reranker=Recorder()).fit(X[:500], y[:500])
    labels = KNNVoteClassifier(n_neighbors=7, reranker=Recorder(lambda c: c.vote_labels))
    labels.fit(X[:500], y[:500])
    queries = X[500:700]
    np.testing.assert_allclose(_quiet(both.predict_proba, queries),
                               plain.predict_proba(queries), rtol=1e-12)
    # Scores are decided by argmax, labels as given: the vote's own labels agree everywhere.
    np.testing.assert_array_equal(_quiet(labels.predict, queries), plain.predict(queries))
    assert both.rerank_fallbacks_ == dict.fromkeys(FALLBACK_REASONS, 0)
    assert not hasattr(plain, "rerank_fallbacks_")


def test_the_context_holds_the_neighbors_that_voted_and_the_query_files(encoded):
    X, y, queries, _ = encoded
    recorder = Recorder()
    clf = KNNVoteClassifier(n_neighbors=5, reranker=recorder).fit(X, y)
    table = _quiet(clf.explain, queries)
    (context,) = recorder.contexts
    assert isinstance(context, RerankContext) and context.n_queries == N_QUERIES
    assert context.query_sources == queries.sources
    np.testing.assert_array_equal(context.rows, np.arange(N_QUERIES))
    np.testing.assert_array_equal(context.classes, clf.classes_)
    np.testing.assert_array_equal(context.vote_labels, table.groupby("query")["vote_label"].first())
    for column, field in (("id", "ids"), ("label", "labels"), ("similarity", "similarities"),
                          ("weight", "weights"), ("source", None)):
        got = context.metadata["source"] if field is None else getattr(context, field)
        np.testing.assert_array_equal(got, table[column].to_numpy().reshape(N_QUERIES, 5))
    assert context.mask.all()
    np.testing.assert_allclose(np.linalg.norm(context.queries, axis=1), 1, rtol=1e-6)


def test_hard_pruned_neighbors_never_reach_the_reranker(digits):
    X, y, _ = digits
    recorder = Recorder()
    clf = KNNVoteClassifier(n_neighbors=10, reranker=recorder).fit(X[:300], y[:300])
    clf.prune("hard", threshold=1)
    table = _quiet(clf.explain, X[300:400])
    (context,) = recorder.contexts
    assert (table["weight"] == 0).sum() > 100  # excluded by pruning
    # Each query's candidates are its voters, nearest first, padded with -1 at the end.
    for q, rows in table.groupby("query"):
        voted = rows[rows["weight"] > 0]
        n = len(voted)
        np.testing.assert_array_equal(context.ids[q, :n], voted["id"])
        np.testing.assert_array_equal(context.weights[q, :n], voted["weight"])
        np.testing.assert_array_equal(context.similarities[q, :n], voted["similarity"])
        assert (context.ids[q, n:] == -1).all() and np.isneginf(context.similarities[q, n:]).all()
        assert (context.weights[q, n:] == 0).all()


def test_labels_and_scores_replace_the_vote_in_every_method(digits):
    X, y, _ = digits
    queries = X[500:520]
    always_three = KNNVoteClassifier(reranker=Recorder(lambda c: np.full(c.n_queries, 3)))
    always_three.fit(X[:500], y[:500])
    assert (_quiet(always_three.predict, queries) == 3).all()
    np.testing.assert_array_equal(_quiet(always_three.predict_proba, queries),
                                  np.eye(10)[np.full(20, 3)])
    table = _quiet(always_three.explain, queries)
    assert (table["reranked_label"] == 3).all() and table["rerank_fallback"].isna().all()
    vote = KNNVoteClassifier().fit(X[:500], y[:500]).predict(queries)
    np.testing.assert_array_equal(table.groupby("query")["vote_label"].first(), vote)
    assert list(table.columns[:7]) == ["query", "modality", "rank", "id", "label",
                                       "similarity", "weight"]
    # Scores: normalised by predict_proba, argmax (lowest class on ties) by predict.
    scores = np.tile(np.arange(10.0), (20, 1))
    scores[:, 2] = 9.0
    by_score = KNNVoteClassifier(reranker=Recorder(lambda c: scores)).fit(X[:500], y[:500])
    np.testing.assert_allclose(_quiet(by_score.predict_proba, queries),
                               scores / scores.sum(axis=1, keepdims=True))
    assert (_quiet(by_score.predict, queries) == 2).all()
    assert _quiet(by_score.score, queries, np.full(20, 2)) == 1.0


def test_string_classes_and_labels_answer(digits):
    X, y, _ = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven",
                      "eight", "nine"])[y]
    clf = KNNVoteClassifier(reranker=Recorder(lambda c: np.full(c.n_queries, "seven",
                                                                dtype=object)))
    assert (_quiet(clf.fit(X[:300], names[:300]).predict, X[300:310]) == "seven").all()


def _bad_answers(context):
    """Per batch of 4: raise; NaN / negative / zero scores; wrong shape; unknown / None labels."""
    batch = context.rows[0] // 4
    n, classes = context.n_queries, context.classes
    if batch == 0:
        raise RuntimeError("the model is down")
    if batch == 1:
        scores = np.ones((n, len(classes)))
        scores[0, 0], scores[1, 0], scores[2] = np.nan, -1.0, 0.0  # query 7 stays valid
        return scores
    if batch == 2:
        return np.ones((n, len(classes) + 1))
    labels = np.array([classes[1], "not a class", None, classes[1]], dtype=object)
    return labels[:n]


def test_a_failing_reranker_falls_back_to_the_vote_counted_and_warned(digits):
    X, y, _ = digits
    queries = X[500:516]
    vote = KNNVoteClassifier().fit(X[:500], y[:500])
    clf = KNNVoteClassifier(reranker=Recorder(_bad_answers, batch_size=4)).fit(X[:500], y[:500])
    with pytest.warns(RerankFallbackWarning) as record:
        predicted = clf.predict(queries)
    message = str(record[0].message)
    assert message == ("13 of 16 queries fell back to the vote: 4 error, 4 wrong shape, "
                       "3 invalid scores, 1 no answer, 1 unknown label (first error: "
                       "RuntimeError: the model is down).")
    assert clf.rerank_fallbacks_ == {"error": 4, "wrong shape": 4, "invalid scores": 3,
                                     "no answer": 1, "unknown label": 1}
    answered = np.array([7, 12, 15])
    expected = vote.predict(queries)
    expected[answered] = [0, 1, 1]  # the all-ones scores give the lowest class
    np.testing.assert_array_equal(predicted, expected)
    with pytest.warns(RerankFallbackWarning):
        proba = clf.predict_proba(queries)
    fell_back = np.setdiff1d(np.arange(16), answered)
    np.testing.assert_array_equal(proba[fell_back], vote.predict_proba(queries)[fell_back])
    np.testing.assert_allclose(proba[7], 0.1)
    with pytest.warns(RerankFallbackWarning):
        table = clf.explain(queries)
    reasons = table.drop_duplicates("query")["rerank_fallback"]
    assert reasons.fillna("").tolist() == (["error"] * 4 + ["invalid scores"] * 3 + [""]
                                           + ["wrong shape"] * 4
                                           + ["", "unknown label", "no answer", ""])


def test_batches_and_a_progress_bar_when_verbose(digits, capsys):
    X, y, _ = digits
    recorder = Recorder(batch_size=3)
    clf = KNNVoteClassifier(reranker=recorder, verbose=1).fit(X[:200], y[:200])
    _quiet(clf.predict, X[200:210])
    assert [c.n_queries for c in recorder.contexts] == [3, 3, 3, 1]
    assert [c.rows.tolist() for c in recorder.contexts][-1] == [9]
    assert "re-ranking" in capsys.readouterr().err
    recorder.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        clf.predict(X[200:210])


def test_reranker_parameter_is_validated_and_cloned(digits):
    X, y, _ = digits
    with pytest.raises(InvalidParameterError, match="reranker"):
        KNNVoteClassifier(reranker="vlm").fit(X[:50], y[:50])
    # A re-ranker's wrong setting is an error of the call, not a fallback.
    for wrong in (EmbeddingReranker(X[:50], n_neighbors=0), EmbeddingReranker(voting="best"),
                  VLMReranker("folder", device="tpu"), VLMReranker("folder", n_neighbors=-1)):
        clf = KNNVoteClassifier(n_neighbors=3, reranker=wrong).fit(X[:50], y[:50])
        with pytest.raises(InvalidParameterError):
            clf.predict(X[:5])
    clf = KNNVoteClassifier(reranker=EmbeddingReranker(X[:50], n_neighbors=3))
    copy = clone(clf)
    assert copy.reranker is not clf.reranker and copy.reranker.n_neighbors == 3
    assert copy.get_params()["reranker__n_neighbors"] == 3
    copy.set_params(reranker__n_neighbors=4)
    assert copy.reranker.n_neighbors == 4 and clf.reranker.n_neighbors == 3


def test_pickled_with_a_reranker(digits):
    X, y, _ = digits
    clf = KNNVoteClassifier(reranker=EmbeddingReranker(X[:300], n_neighbors=3))
    clf.fit(X[:300], y[:300])
    restored = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(_quiet(restored.predict_proba, X[300:400]),
                                  _quiet(clf.predict_proba, X[300:400]))


# -- EmbeddingReranker ---------------------------------------------------------------------


def _numpy_two_stage(cheap_memory, cheap_queries, full_memory, full_queries, y, k, k2):
    """Retrieve k by cosine in the cheap space, re-sort by the full one, rank-vote the top k2."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(cheap_queries) @ unit(cheap_memory).T
    candidates = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    full = np.einsum("qd,qkd->qk", unit(full_queries), unit(full_memory)[candidates])
    order = np.argsort(-full, axis=1, kind="stable")[:, :k2]
    voters = np.take_along_axis(candidates, order, axis=1)
    votes = np.zeros((len(cheap_queries), 10))
    np.add.at(votes, (np.arange(len(votes))[:, None], y[voters]), 1 / (np.arange(k2) + 2))
    return votes / votes.sum(axis=1, keepdims=True)


def test_embedding_reranker_matches_numpy(digits):
    X, y, _ = digits
    pca = PCA(6, random_state=0).fit(X[:1000])
    cheap = pca.transform(X).astype(np.float32)
    expected = _numpy_two_stage(cheap[:1000], cheap[1000:], X[:1000], X[1000:], y[:1000],
                                40, 10)
    for second in (X[:1000], dict(enumerate(X[:1000])), pd.DataFrame(X[:1000])):
        clf = KNNVoteClassifier(n_neighbors=40, reranker=EmbeddingReranker(
            second, encoder=lambda rows: X[rows], n_neighbors=10))
        clf.fit(cheap[:1000], y[:1000])
        queries = Embeddings(cheap[1000:], list(range(1000, len(X))))
        np.testing.assert_allclose(_quiet(clf.predict_proba, queries), expected, atol=1e-6)
    single = KNNVoteClassifier(n_neighbors=10).fit(cheap[:1000], y[:1000])
    assert (expected.argmax(1) == y[1000:]).mean() > single.score(cheap[1000:], y[1000:]) + 0.05


def test_embedding_reranker_without_encoder_uses_the_queries_as_searched(digits):
    # A quantised memory: the queries are full precision, in the second embedding's space.
    X, y, _ = digits
    coarse = np.round(X / 4)
    expected = _numpy_two_stage(coarse[:800], X[800:], X[:800], X[800:], y[:800], 30, 30)
    clf = KNNVoteClassifier(n_neighbors=30, reranker=EmbeddingReranker(X[:800]))
    clf.fit(coarse[:800], y[:800])
    same = np.isclose(_quiet(clf.predict_proba, X[800:]), expected, atol=1e-6).all(axis=1)
    # The coarse memory has exact ties; float32 and float64 may split one at the 30th.
    assert same.mean() > 0.995


def test_embedding_reranker_encodes_the_source_files(encoded, digits):
    X, y, queries, _ = encoded
    pixels = lambda paths: np.stack([np.asarray(Image.open(p), dtype=np.float32).ravel()  # noqa: E731
                                     for p in paths])
    calls = []
    encoder = lambda paths: calls.append(len(paths)) or pixels(paths)  # noqa: E731
    by_files = KNNVoteClassifier(n_neighbors=20, reranker=EmbeddingReranker(
        encoder=encoder, n_neighbors=5)).fit(X, y)
    by_id = KNNVoteClassifier(n_neighbors=20, reranker=EmbeddingReranker(
        pixels(X.sources), encoder=pixels, n_neighbors=5)).fit(X, y)
    np.testing.assert_allclose(_quiet(by_files.predict_proba, queries),
                               _quiet(by_id.predict_proba, queries))
    # Each distinct candidate file once, then the queries.
    assert calls[0] == len(np.unique(by_files.kneighbors(queries, return_distance=False)))
    assert calls[1] == N_QUERIES


def test_embedding_reranker_errors_fall_back_with_their_message(digits):
    X, y, _ = digits
    cases = [
        (EmbeddingReranker(X[:100]), "Memory id 1.. has no second embedding"),
        (EmbeddingReranker(PCA(3).fit_transform(X[:200])), "dimension 3 but the queries 64"),
        (EmbeddingReranker(), "needs embeddings="),
        (EmbeddingReranker(encoder=lambda p: p), "some memory items have none"),
        (EmbeddingReranker(X[:200], encoder=lambda p: p), "the queries' files are unknown"),
    ]
    for reranker, message in cases:
        clf = KNNVoteClassifier(reranker=reranker).fit(X[:200], y[:200])
        with pytest.warns(RerankFallbackWarning, match=message):
            predicted = clf.predict(X[150:160])
        np.testing.assert_array_equal(predicted, KNNVoteClassifier().fit(
            X[:200], y[:200]).predict(X[150:160]))
        assert clf.rerank_fallbacks_["error"] == 10


def test_embedding_reranker_n_neighbors_and_voting(digits):
    X, y, _ = digits
    for voting in ("plurality", "softmax", "distance"):
        clf = KNNVoteClassifier(n_neighbors=25, reranker=EmbeddingReranker(
            X[:600], voting=voting, n_neighbors=25)).fit(X[:600], y[:600])
        plain = KNNVoteClassifier(n_neighbors=25, voting=voting).fit(X[:600], y[:600])
        # Same embedding twice: re-sorting changes nothing, the votes are the first stage's.
        np.testing.assert_allclose(_quiet(clf.predict_proba, X[600:700]),
                                   plain.predict_proba(X[600:700]), atol=1e-6)


# -- VLMReranker ---------------------------------------------------------------------------

WORDS = list("0123456789") + ["Label", ":", ".", ",", "?", "user", "assistant", "the",
                              "image", "label", "of", "last", "What", "is"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %} "
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def _tiny_vlm(folder, answer=None):
    """Save a tiny random LLaVA and its processor to `folder`; it answers `answer` if given."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {word: i for i, word in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # words joined by spaces
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=1024,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=vocab["<image>"], image_seq_length=4, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    if answer is not None:  # greedy decoding can only say `answer`
        model.generation_config.suppress_tokens = [i for i in range(len(vocab))
                                                   if i != vocab[answer]]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                           crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    pytest.importorskip("transformers")
    return _tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="module")
def tiny_vlm_seven(tmp_path_factory):
    pytest.importorskip("transformers")
    return _tiny_vlm(tmp_path_factory.mktemp("tiny_vlm_seven"), answer="7")


def test_a_tiny_vlm_reranks_end_to_end_from_a_local_folder(encoded, tiny_vlm_seven):
    X, y, queries, _ = encoded
    clf = KNNVoteClassifier(n_neighbors=5, reranker=VLMReranker(
        tiny_vlm_seven, n_neighbors=3, max_new_tokens=1, batch_size=4)).fit(X, y)
    assert (_quiet(clf.predict, queries) == 7).all()
    assert sum(clf.rerank_fallbacks_.values()) == 0
    table = _quiet(clf.explain, queries)
    assert (table["reranked_label"] == 7).all()
    assert (table.groupby("query")["vote_label"].first()
            == KNNVoteClassifier(n_neighbors=5).fit(X, y).predict(queries)).all()


def test_a_random_tiny_vlm_answers_are_parsed_or_fall_back(encoded, tiny_vlm):
    X, y, queries, _ = encoded
    reranker = VLMReranker(tiny_vlm, n_neighbors=2, max_new_tokens=3, batch_size=5).load()
    clf = KNNVoteClassifier(n_neighbors=4, reranker=reranker).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RerankFallbackWarning)
        predicted = clf.predict(queries)
    assert set(predicted) <= set(clf.classes_)
    assert sum(clf.rerank_fallbacks_.values()) <= N_QUERIES
    assert not clf.rerank_fallbacks_["error"]


def test_prompts_show_the_neighbors_nearest_first_then_the_query(encoded, tiny_vlm):
    X, y, queries, _ = encoded
    reranker = VLMReranker(tiny_vlm, n_neighbors=3, prompt="Guess among {labels} of {classes}")
    recorder = Recorder()
    clf = KNNVoteClassifier(n_neighbors=5, reranker=recorder).fit(X, y)
    _quiet(clf.predict, queries)
    (context,) = recorder.contexts
    prompts = reranker.prompts(context)
    for q, (messages, images) in enumerate(prompts):
        content = messages[0]["content"]
        expected = [Image.open(path).convert("RGB") for path in
                    list(context.metadata["source"][q, :3]) + [queries.sources[q]]]
        assert [np.asarray(i).tolist() for i in images] == [np.asarray(i).tolist()
                                                           for i in expected]
        assert [part["type"] for part in content] == ["image", "text"] * 4
        labels = [str(label) for label in context.labels[q, :3]]
        assert [part["text"] for part in content[1:6:2]] == [f"Label: {s}" for s in labels]
        assert content[-1]["text"] == (f"Guess among {', '.join(dict.fromkeys(labels))} of "
                                       "0, 1, 2, 3, 4, 5, 6, 7, 8, 9")
    # The processor's chat template puts one image token per image; the model sees them all.
    model, processor = reranker._loaded()
    text = processor.apply_chat_template(prompts[0][0], add_generation_prompt=True)
    assert text.count("<image>") == 4 and text.startswith("user: <image> Label: ")
    inputs = processor(text=[text], images=[prompts[0][1]], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 4
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 4 * 4
    # n_neighbors=0: the query alone, the paper's no-neighbor baseline.
    alone = VLMReranker(tiny_vlm, n_neighbors=0).prompts(context)
    assert [len(images) for _, images in alone] == [1] * N_QUERIES


def test_images_from_an_array_by_id_and_queries_without_files(digits, encoded, tiny_vlm):
    X, y, queries, _ = encoded
    _, _, images = digits
    pictures = (images * 15).astype(np.uint8)
    reranker = VLMReranker(tiny_vlm, n_neighbors=2, images=pictures)
    recorder = Recorder()
    clf = KNNVoteClassifier(n_neighbors=3, reranker=recorder).fit(np.asarray(X), y)
    _quiet(clf.predict, queries)
    _quiet(clf.predict, np.asarray(queries))  # no files
    with_files, without = recorder.contexts
    (_, shown), = reranker.prompts(with_files)[:1]
    np.testing.assert_array_equal(np.asarray(shown[0])[..., 0], pictures[with_files.ids[0, 0]])
    assert reranker.prompts(without) == [None] * N_QUERIES
    clf.set_params(reranker=reranker)
    with pytest.warns(RerankFallbackWarning, match=f"{N_QUERIES} no answer"):
        clf.predict(np.asarray(queries))


def test_generation_is_batched(encoded, tiny_vlm, monkeypatch):
    X, y, queries, _ = encoded
    reranker = VLMReranker(tiny_vlm, n_neighbors=2, batch_size=5, max_new_tokens=2)
    sizes, generate = [], VLMReranker.generate

    def counting(self, prompts):
        sizes.append(len(prompts))
        answers = generate(self, prompts)  # the real model, left-padded batches
        assert len(answers) == len(prompts) and all(isinstance(a, str) for a in answers)
        return answers

    monkeypatch.setattr(VLMReranker, "generate", counting)
    clf = KNNVoteClassifier(n_neighbors=3, reranker=reranker).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RerankFallbackWarning)
        clf.predict(queries)
    assert sizes == [5, 5, 2]


@pytest.mark.parametrize("answer, expected", [
    ("3", 3), (" 3.\nbecause it looks so", 3), ("Seven", "seven"), ("SEVEN!", "seven"),
    ("sevn", "seven"), ("a seven", "seven"), ("", None), ("a cat", None), ("none of them", None),
])
def test_answers_are_parsed_exactly_then_ignoring_case_then_fuzzily(answer, expected):
    classes = np.array([3, "seven", "eight"], dtype=object)
    assert VLMReranker.parse(answer, classes) == expected


def test_answers_map_to_classes_or_fall_back(encoded, tiny_vlm, monkeypatch):
    X, y, queries, _ = encoded
    names = np.array(["zero", "one", "two", "three", "four", "Five", "six", "seven", "eight",
                      "nine"])
    answers = ["seven", "SEVEN", "sevn", "five", "Five.", "no idea", "", "the cat"] + ["2"] * 4
    monkeypatch.setattr(VLMReranker, "generate", lambda self, prompts: answers[:len(prompts)])
    clf = KNNVoteClassifier(n_neighbors=3, reranker=VLMReranker(tiny_vlm, batch_size=None))
    clf.fit(X, names[y])
    vote = KNNVoteClassifier(n_neighbors=3).fit(X, names[y]).predict(queries)
    with pytest.warns(RerankFallbackWarning, match="7 of 12 queries fell back"):
        predicted = clf.predict(queries)
    np.testing.assert_array_equal(predicted[:5], ["seven", "seven", "seven", "Five", "Five"])
    np.testing.assert_array_equal(predicted[5:], vote[5:])
    assert clf.rerank_fallbacks_["no answer"] == 7


def test_pickled_without_weights_and_reloaded_lazily(encoded, tiny_vlm_seven):
    X, y, queries, _ = encoded
    reranker = VLMReranker(tiny_vlm_seven, n_neighbors=2, max_new_tokens=1)
    clf = KNNVoteClassifier(n_neighbors=3, reranker=reranker).fit(X, y)
    _quiet(clf.predict, queries)
    assert "_cache" in clf.reranker.__dict__
    data = pickle.dumps(clf)
    assert b"LlavaForConditionalGeneration" not in data  # the loaded model is not in it
    restored = pickle.loads(data)
    assert "_cache" not in restored.reranker.__dict__
    assert (_quiet(restored.predict, queries) == 7).all()
    assert "_cache" not in clone(clf).reranker.__dict__


def test_a_loaded_model_and_processor_can_be_passed(encoded, tiny_vlm_seven):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    X, y, queries, _ = encoded
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_seven)
    processor = AutoProcessor.from_pretrained(tiny_vlm_seven)
    clf = KNNVoteClassifier(n_neighbors=3, reranker=VLMReranker(
        model, processor, max_new_tokens=1)).fit(X, y)
    assert (_quiet(clf.predict, queries) == 7).all()


def test_a_hub_name_without_network_says_to_pass_a_local_folder(monkeypatch):
    pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="(?s)needs network access.*pass a local folder"):
        VLMReranker("HuggingFaceTB/SmolVLM-256M-Instruct").load()
