"""A memory held in Milvus (Lite or a server): handle, connection, schema, backend.

Needs ``pip install "skmml[milvus]"`` (pymilvus and milvus-lite).
"""

from ._memory import MilvusMemory

__all__ = ["MilvusMemory"]
