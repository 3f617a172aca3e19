"""A skmml memory's collection in Milvus: its schema, layout and row codec."""

import json

import numpy as np
import pandas as pd

from ._connection import _pymilvus

#: Modality codes in the collection's ``modality`` field.
MODALITY_CODES = {"image": 0, "text": 1}
#: Index types a collection may be built with (IVF_PQ and DISKANN on a server).
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "DISKANN")
#: Milvus consistency levels; "Strong" makes every write visible to the next read.
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
#: Milvus's largest top-k.
MAX_TOP_K = 16384
#: Longest string label a collection stores.
MAX_LABEL_LENGTH = 1024
_FORMAT = "skmml.MilvusMemory"
#: Layout of the collections; version 2 added the commit log and row keys.
LAYOUT_VERSION = 2
_ALLOCATOR_SUFFIX = "__skmml_ids"
#: Most ids by which explicit ids may move the high-water mark in one call.
_MAX_MARK_JUMP = 2**20
#: Collection property holding the layout (labels' type, id base).
_LAYOUT_KEY = "skmml.layout"


def _create_collection(client, name, dim, labels_kind, id_base, index_type, index_params,
                       timeout):
    """Create the memory's collection and its two companions (ids, commit log).

    Rows are immutable records with a Milvus-generated key: the item's id is
    a field, and ``batch`` names the write that inserted the row, visible
    once the commit log says it committed (see :mod:`._log`).
    """
    from ._log import create_log

    pymilvus = _pymilvus()
    DataType = pymilvus.DataType
    schema = pymilvus.MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    schema.add_field("key", DataType.INT64, is_primary=True)
    schema.add_field("id", DataType.INT64)
    schema.add_field("batch", DataType.INT64)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    if labels_kind == "integer":
        schema.add_field("label", DataType.INT64)
    else:
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL_LENGTH)
    schema.add_field("modality", DataType.INT8)
    schema.add_field("metadata", DataType.JSON)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type=index_type, metric_type="IP",
                    params=index_params)
    layout = {"format": _FORMAT, "version": LAYOUT_VERSION, "labels": labels_kind,
              "id_base": id_base}
    # One shard: every write is one message stream, applied in order.
    client.create_collection(name, schema=schema, index_params=index,
                             consistency_level="Strong", num_shards=1, timeout=timeout,
                             properties={_LAYOUT_KEY: json.dumps(layout)})
    allocator = pymilvus.MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
    allocator.add_field("id", DataType.INT64, is_primary=True)
    allocator.add_field("slot", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index("slot", index_type="FLAT", metric_type="IP")
    client.create_collection(name + _ALLOCATOR_SUFFIX, schema=allocator, index_params=index,
                             num_shards=1, timeout=timeout)
    create_log(client, name, timeout)


def _metadata_frame(rows):
    """The "metadata" JSON of `rows`, one DataFrame row each."""
    return pd.DataFrame.from_records([row.get("metadata") or {} for row in rows],
                                     index=pd.RangeIndex(len(rows)))


def _label_kind(labels):
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        return "integer"
    if labels.dtype.kind in "US":
        if labels.size and max(len(str(v)) for v in np.unique(labels)) > MAX_LABEL_LENGTH:
            raise ValueError(f"Milvus memories store labels of at most {MAX_LABEL_LENGTH} "
                             "characters.")
        return "string"
    raise ValueError(f"Milvus memories take integer or string labels, got {labels.dtype}.")


def _labels_array(labels, kind, missing=None):
    labels = np.asarray(labels, dtype=object)
    if missing is not None:
        labels = np.where(missing, 0 if kind == "integer" else "", labels)
    if kind == "integer":
        return labels.astype(np.int64)
    return labels.astype(str)


def _classes(counts, kind):
    labels = sorted({label for bucket in counts.values() for label, n in bucket.items() if n})
    return _labels_array(labels, kind) if labels else np.empty(
        0, dtype=np.int64 if kind == "integer" else "<U1")


def _rows(ids, embeddings, labels, modality, metadata, batch):
    """Rows for ``client.insert``, written by `batch`: a list of dicts (no column dict)."""
    records = (json.loads(metadata.to_json(orient="records")) if metadata.shape[1]
               else [{}] * len(ids))
    code = MODALITY_CODES[modality]
    return [{"id": int(i), "batch": batch, "embedding": e, "label": label.item(),
             "modality": code, "metadata": m}
            for i, e, label, m in zip(ids, embeddings, np.asarray(labels), records)]
