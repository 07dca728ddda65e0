"""tiercache: a persistent, disk-backed, tiered prefix (KV) cache for MLX inference.

The public API is small:

* :class:`TieredPromptCache` — mlx-lm's ``LRUPromptCache`` interface over a memory
  tier and a disk tier (the server's cache).
* :class:`DiskStore` — the disk tier on its own (tools, import/export, warming).
* :class:`MemoryPromptCache` — the memory tier on its own.
* :class:`FetchResult`, :func:`model_namespace`.
* :class:`TiercacheError` — the root of every error tiercache raises on purpose
  (:class:`StoreError`, :class:`ConfigError`, ...; see :mod:`tiercache.errors`).
"""

from .errors import ConfigError, TiercacheError
from .store.disk import DiskStore, StoreError
from .store.namespaces import model_namespace
from .tiers.memory import MemoryPromptCache
from .tiers.tiered import FetchResult, TieredPromptCache

__all__ = [
    "ConfigError",
    "DiskStore",
    "FetchResult",
    "MemoryPromptCache",
    "StoreError",
    "TieredPromptCache",
    "TiercacheError",
    "model_namespace",
]
__version__ = "0.1.0"
