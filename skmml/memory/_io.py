"""Memories on disk: an ``.npz`` archive (no pickle inside), written atomically, loaded checked.

Format version 3 lists every member in the header with its size and SHA-256
digest, checked on load; version 2 added the id high-water mark
(``next_id``). Versions 1 and 2 still load (without digests; a version 1
file's mark is one above its largest id).
"""

import contextlib
import hashlib
import io
import json
import os
import secrets
import zipfile

import numpy as np
import pandas as pd

from .._process import is_dead, process_tag
from .._validation import check_embeddings, check_ids, check_labels
from ._bank import MODALITIES, MemoryBank

_FORMAT = "skmml.Memory"
_FORMAT_VERSION = 3
_READ_VERSIONS = (1, 2, 3)
_TMP_SUFFIX = ".skmml-tmp"


def _tmp_name(path):
    """A temporary file beside `path`, named by its writer (see :func:`remove_stale_tmp`)."""
    folder, base = os.path.split(os.path.abspath(path))
    tag = process_tag().replace("|", "~").replace(os.sep, "_")
    return os.path.join(folder, f".{base}.{tag}~{secrets.token_hex(4)}{_TMP_SUFFIX}")


def remove_stale_tmp(path):
    """Delete temporary files of `path` left by saves whose process died (SIGKILL, power loss).

    A temporary file names its writer (host, pid, process start time); one
    whose writer runs on this host and is gone is removed. Files of live
    writers, or of other hosts sharing the folder, are left alone. Returns
    the number removed.
    """
    folder, base = os.path.split(os.path.abspath(path))
    prefix, removed = f".{base}.", 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TMP_SUFFIX)):
            continue
        tag = name[len(prefix):-len(_TMP_SUFFIX)].rsplit("~", 1)[0].replace("~", "|")
        if is_dead(tag):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def save_banks(banks, next_id, path):
    """Write `banks` ({modality: MemoryBank}) and `next_id` to `path`, atomically.

    The archive goes to a temporary file in the same folder, flushed to disk
    (fsync) and renamed over `path`: a crash or a full disk leaves the
    previous file intact.
    """
    header = {"format": _FORMAT, "version": _FORMAT_VERSION, "next_id": next_id,
              "banks": {}}
    arrays = {}
    for modality in MODALITIES:
        bank = banks[modality]
        labels = bank.labels
        header["banks"][modality] = {"labels_dtype": labels.dtype.str}
        if labels.dtype.kind == "O":
            labels = labels.astype(str)
        arrays[f"{modality}_embeddings"] = bank.embeddings
        arrays[f"{modality}_labels"] = labels
        arrays[f"{modality}_ids"] = bank.ids
        if bank.metadata.shape[1]:
            buffer = io.BytesIO()
            bank.metadata.to_parquet(buffer, index=False)
            arrays[f"{modality}_metadata"] = np.frombuffer(buffer.getvalue(), np.uint8)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_tmp(path)
    tmp = _tmp_name(path)
    # Created as open() creates files (0666 less the umask), unlike mkstemp's 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with contextlib.suppress(OSError):  # an existing target keeps its mode
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        with os.fdopen(fd, "wb") as f:
            _write_archive(f, arrays, header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


class _Hashing:
    """A writable file that hashes (SHA-256) and counts what passes through it."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.bytes += memoryview(data).nbytes
        return self.f.write(data)


def _write_archive(f, arrays, header):
    """An ``.npz`` of `arrays` (as ``np.savez`` writes it), then the header with their digests.

    Each member is hashed as it streams out: no copy of the arrays is made.
    """
    members = {}
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                hashing = _Hashing(member)
                np.lib.format.write_array(hashing, np.asanyarray(array), allow_pickle=False)
            members[name] = {"bytes": hashing.bytes, "sha256": hashing.sha256.hexdigest()}
        raw = np.frombuffer(json.dumps(dict(header, members=members)).encode(), np.uint8)
        with archive.open("header.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, raw, allow_pickle=False)


def _check_members(path, header, sizes):
    """The archive holds exactly the header's members, each with its size and digest."""
    listed = header.get("members")
    if not isinstance(listed, dict):
        raise ValueError("its header does not list its members")
    present = set(sizes) - {"header"}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise ValueError(f"members listed in its header are missing: {missing}")
    if extra:
        raise ValueError(f"it holds members its header does not list: {extra}")
    with zipfile.ZipFile(path) as archive:
        for name, expected in sorted(listed.items()):
            with archive.open(f"{name}.npy") as member:
                digest, size = hashlib.sha256(), 0
                while chunk := member.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            if not isinstance(expected, dict) or digest.hexdigest() != expected.get("sha256"):
                raise ValueError(f"member {name!r} does not match the digest in its header: "
                                 "the file was altered or is corrupt")
            if size != expected.get("bytes"):
                raise ValueError(f"member {name!r} has {size} bytes, its header says "
                                 f"{expected.get('bytes')}")


def _fsync_folder(folder):
    """Make a rename in `folder` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _declared_sizes(path, max_bytes):
    """Bytes each ``.npy`` member of the archive declares, checked against `max_bytes`.

    Reads only the members' headers: nothing is decompressed or allocated.
    """
    sizes, total = {}, 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"unexpected member {info.filename!r} in the archive")
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, _, dtype = reader(member, max_header_size=10_000)
            if dtype.hasobject:
                raise ValueError(f"array {info.filename[:-4]!r} holds Python objects")
            nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if nbytes > info.file_size:
                raise ValueError(
                    f"array {info.filename[:-4]!r} declares {nbytes} bytes but its member "
                    f"holds {info.file_size}: the file is truncated or corrupt"
                )
            total += nbytes
            if total > max_bytes:
                raise ValueError(
                    f"its arrays declare more than max_bytes={max_bytes} bytes; pass a larger "
                    "max_bytes to Memory.load for a file you trust"
                )
            sizes[info.filename[:-4]] = nbytes
    return sizes, max_bytes - total


def load_banks(path, max_bytes):
    """(image bank, text bank), next_id of the file `path`, every array checked."""
    sizes, budget = _declared_sizes(path, max_bytes)
    if "header" not in sizes:
        raise ValueError("it has no header: it is not a saved skmml Memory")
    with np.load(path, allow_pickle=False) as archive:
        try:
            header = json.loads(archive["header"].tobytes())
        except ValueError as exc:
            raise ValueError(f"its header is not valid JSON ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise ValueError("it is not a saved skmml Memory")
        if header.get("version") not in _READ_VERSIONS:
            raise ValueError(
                f"it has Memory format version {header.get('version')}; this skmml reads "
                f"versions {list(_READ_VERSIONS)}"
            )
        if header["version"] >= 3:
            _check_members(path, header, sizes)
        next_id = header.get("next_id", 0)  # version 1 files: one above the largest id
        if isinstance(next_id, bool) or not isinstance(next_id, int) or not (
                0 <= next_id <= np.iinfo(np.int64).max):
            raise ValueError(f"its header's next_id {next_id!r} is not an id")
        expected = {"header"} | {f"{m}_{a}" for m in MODALITIES
                                 for a in ("embeddings", "labels", "ids")}
        missing = expected - set(sizes)
        if missing:
            raise ValueError(f"missing arrays: {sorted(missing)}")
        unknown = set(sizes) - expected - {f"{m}_metadata" for m in MODALITIES}
        if unknown:
            raise ValueError(f"unexpected arrays: {sorted(unknown)}")
        banks = []
        for modality in MODALITIES:
            embeddings = archive[f"{modality}_embeddings"]
            n = embeddings.shape[0] if embeddings.ndim else -1
            if embeddings.ndim != 2 or embeddings.dtype != np.float32:
                raise ValueError(
                    f"{modality} embeddings must be a 2-D float32 array, got "
                    f"{embeddings.dtype} of shape {embeddings.shape}"
                )
            labels = _stored_labels(archive[f"{modality}_labels"],
                                    header["banks"][modality]["labels_dtype"], modality)
            labels = check_labels(labels, n, name=f"{modality} labels")
            ids = check_ids(archive[f"{modality}_ids"], n, name=f"{modality} ids")
            key = f"{modality}_metadata"
            if key in sizes:
                metadata = _read_metadata(archive[key].tobytes(), n, budget, modality)
            else:
                metadata = pd.DataFrame(index=pd.RangeIndex(n))
            if n:
                embeddings = check_embeddings(embeddings, name=f"{modality} embeddings")
                norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings,
                                          dtype=np.float64))
                # Unit rows, or all-zero ones (kept with similarity 0 to everything).
                off = np.flatnonzero((np.abs(norms - 1.0) > 1e-3) & (norms != 0.0))
                if off.size:
                    raise ValueError(
                        f"{modality} embeddings are not of unit norm ({off.size} rows, e.g. "
                        f"row {off[0]} has norm {norms[off[0]]:.6g}); save() writes unit "
                        "or all-zero rows"
                    )
            banks.append(MemoryBank(embeddings, labels, ids, metadata))
    return banks, next_id


def _stored_labels(labels, dtype_str, modality):
    """Labels as saved, in the header's dtype, refusing a dtype that changes them."""
    dtype = np.dtype(dtype_str)
    if dtype.hasobject:
        return labels.astype(object)
    if dtype.kind not in "biufU":
        raise ValueError(f"{modality} labels_dtype {dtype_str!r} is not supported")
    converted = labels.astype(dtype)
    if not np.array_equal(converted, labels):
        raise ValueError(
            f"{modality} labels_dtype {dtype_str!r} in the header does not hold the stored "
            f"{labels.dtype} labels without changing them"
        )
    return converted


def _read_metadata(raw, n, budget, modality):
    """Parquet metadata, its declared uncompressed size checked before reading."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(io.BytesIO(raw))
    declared = sum(parquet.metadata.row_group(i).total_byte_size
                   for i in range(parquet.metadata.num_row_groups))
    if declared > budget:
        raise ValueError(
            f"{modality} metadata declares {declared} bytes, above what max_bytes allows"
        )
    if parquet.metadata.num_rows != n:
        raise ValueError(
            f"{modality} metadata has {parquet.metadata.num_rows} rows but there are {n} "
            "embeddings"
        )
    return pd.read_parquet(io.BytesIO(raw))
