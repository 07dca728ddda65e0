"""The cache tiers on top of the store: memory, background writer, tiered cache.

Also the per-request checkpoint policy that decides what a server inserts.
"""

from .memory import MemoryPromptCache
from .tiered import FetchResult, TieredPromptCache

__all__ = ["FetchResult", "MemoryPromptCache", "TieredPromptCache"]
