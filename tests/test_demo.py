from skmml import demo


def test_demo_shows_the_whole_system_and_writes_the_figure(capsys, tmp_path):
    figure = demo.main(out=tmp_path)
    out = capsys.readouterr().out
    for step in ("1. Real images in class folders", "2. A memory from the folders",
                 "3. MemoryModularClassifier: trained on 0-4, memory replaced by 5-9",
                 "4. KNNVoteClassifier: a new class", "5. One decision explained"):
        assert step in out
    assert "Memory(n_images=400, n_texts=0, n_features=1280, n_classes=10)" in out
    assert "accuracy on 9s: 0.000 without them in memory" in out
    assert "it is no longer among the ids that vote: True" in out
    for baseline in ("MemoryModularClassifier", "prototypes (class means)", "kNN rank voting"):
        assert f"    {baseline}" in out
    assert figure == tmp_path / "skmml-demo-explanation.png" and figure.stat().st_size > 10_000
    assert f"figure: {figure.resolve()}" in out
