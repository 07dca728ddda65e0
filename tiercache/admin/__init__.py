"""The read side for people and tools: inspection queries and mlx-lm interop.

Used by the CLI; built on the store, never imported by it.
"""
