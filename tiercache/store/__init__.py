"""The disk store: everything that knows the on-disk format.

Hashing, block files, the LMDB index, chain lookup, restore, repair and model
namespaces. Nothing here knows about the memory tier or the server.
"""

from .disk import DiskStore, StoreError
from .namespaces import model_namespace

__all__ = ["DiskStore", "StoreError", "model_namespace"]
