"""What this machine computes fast: measured once, cached in the process and on disk.

Some choices (a reduced-precision screen for exact search, bfloat16 heads)
pay on one CPU and cost on another, so skmml times them on first use. The
results are kept in this process and in a small JSON file under
``$SKMML_CACHE_DIR`` (default ``~/.cache/skmml``), named by a digest of the
CPU's flags, the core count and the library versions, so that another
process on the same machine reuses them and a different machine or upgrade
measures again. Delete the file to measure again.
"""

import hashlib
import json
import os
import platform
import threading
import time

import numpy as np
import torch

_CHOICES = {}
_LOCK = threading.Lock()


def best_time(fn, repeats=3, give_up=np.inf):
    """Best of `repeats` timed calls after a warm-up; stops early past `give_up` seconds."""
    start = time.perf_counter()
    fn()
    best = time.perf_counter() - start
    for _ in range(repeats):
        if best > give_up:
            break
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measured(key, measure):
    """The cached result of `measure()` under `key` (a JSON value), measured once."""
    with _LOCK:
        if key not in _CHOICES:
            _CHOICES.update(_read_cache())
        if key not in _CHOICES:
            _CHOICES[key] = measure()
            _write_cache(_CHOICES)
        return _CHOICES[key]


def cache_path():
    """The file holding this machine's measured choices."""
    folder = os.environ.get("SKMML_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "skmml")
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        cpu = ""
    machine = "|".join([platform.machine(), platform.processor(), cpu, torch.__version__,
                        np.__version__, str(os.cpu_count())])
    digest = hashlib.sha256(machine.encode()).hexdigest()[:16]
    return os.path.join(folder, f"machine-{digest}.json")


def _read_cache():
    try:
        with open(cache_path()) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _write_cache(choices):
    """Write the choices atomically; a cache that cannot be written is skipped."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(choices, f)
        os.replace(tmp, path)
    except OSError:
        pass


def bf16_matmul_gain():
    """float32 GEMM time / bfloat16 GEMM time of torch on this CPU (measured once).

    Above 1 where the CPU multiplies bfloat16 natively (AVX-512 BF16, AMX);
    well below 1 where torch emulates it.
    """
    def measure():
        # Small enough to cost well under a second where bfloat16 is emulated.
        a, b = torch.randn(128, 512), torch.randn(512, 512)
        fp32 = best_time(lambda: a @ b)
        a, b = a.bfloat16(), b.bfloat16()
        return fp32 / best_time(lambda: a @ b, give_up=2 * fp32)

    return measured("matmul/bf16_gain", measure)
