"""Images/s of CLIPImageEncoder.transform vs a plain open_clip loop, files on disk.

Both encode the same JPEG files with the same model and batch size; the
plain loop is what a user writes by hand (decode, preprocess, stack and
encode one batch after another in one process). The wrapper decodes and
preprocesses in DataLoader worker processes while the model runs.

The weights do not change the speed, so with no network the model is the
named architecture with random weights, saved once to a local checkpoint that
both load; ``--pretrained PATH`` loads another local checkpoint instead. Files: 320x320 JPEGs made from scikit-learn's digits,
written to a cache folder outside the repository.

Run: ``python benchmarks/bench_encoders.py [--model ViT-B-32] [--n-images 256]
[--batch-size 64] [--device cpu]``.
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

from skmml import CLIPImageEncoder

CACHE = Path(os.environ.get("SKMML_BENCH_CACHE", Path.home() / ".cache" / "skmml" / "bench"))


def image_files(n, size=320):
    """`n` JPEG files of `size` x `size` pixels (digits, enlarged, with noise)."""
    folder = CACHE / f"jpeg_{size}_{n}"
    files = [folder / f"{i}.jpg" for i in range(n)]
    if not all(f.exists() for f in files):
        folder.mkdir(parents=True, exist_ok=True)
        images = load_digits().images
        rng = np.random.default_rng(0)
        for i, f in enumerate(files):
            digit = Image.fromarray((images[i % len(images)] * 15).astype(np.uint8))
            big = np.asarray(digit.resize((size, size), Image.BICUBIC), dtype=np.float32)
            colour = big[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8)).save(f, quality=90)
    return [str(f) for f in files]


def plain_loop(model, preprocess, files, batch_size, device):
    """The hand-written open_clip loop."""
    out = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            batch = torch.stack([preprocess(Image.open(f).convert("RGB"))
                                 for f in files[start:start + batch_size]]).to(device)
            features = model.encode_image(batch)
            out.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
    return np.concatenate(out)


def best_rate(fn, n, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None, help="local checkpoint (default: none)")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import open_clip

    if args.pretrained is None:
        args.pretrained = str(CACHE / f"{args.model}_random_weights.pt")
        if not os.path.exists(args.pretrained):
            torch.manual_seed(0)
            CACHE.mkdir(parents=True, exist_ok=True)
            torch.save(open_clip.create_model(args.model).state_dict(), args.pretrained)
    files = image_files(args.n_images)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), device {args.device}")
    print(f"{args.model} ({args.pretrained}), "
          f"{len(files)} JPEG files of 320x320, batch size {args.batch_size}")
    model, _, preprocess = open_clip.create_model_and_transforms(
        args.model, pretrained=args.pretrained, device=args.device)
    model.eval()
    encoders = {
        f"CLIPImageEncoder(num_workers={n})": CLIPImageEncoder(
            args.model, pretrained=args.pretrained, device=args.device,
            batch_size=args.batch_size, num_workers=n)
        for n in (0, 1, 2)
    }
    reference = plain_loop(model, preprocess, files[:args.batch_size], args.batch_size,
                           args.device)
    for encoder in encoders.values():  # warm up: load the model, check the output
        np.testing.assert_allclose(encoder.transform(files[:args.batch_size]), reference,
                                   atol=1e-4)
    rates = {"plain open_clip loop": best_rate(
        lambda: plain_loop(model, preprocess, files, args.batch_size, args.device),
        len(files), args.repeats)}
    for name, encoder in encoders.items():
        rates[name] = best_rate(lambda: encoder.transform(files), len(files), args.repeats)
    base = rates["plain open_clip loop"]
    print(f"{'method':<28} {'images/s':>9} {'vs loop':>8}")
    for name, rate in rates.items():
        print(f"{name:<28} {rate:9.1f} {rate / base:8.2f}x")


if __name__ == "__main__":
    main()
