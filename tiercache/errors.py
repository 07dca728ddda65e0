"""The root of every error tiercache raises on purpose.

Callers (the CLI, the server, an application) catch :class:`TiercacheError` to
handle any of them. Each error class lives next to the code that raises it and
derives from the root:

* :class:`ConfigError` (here) — a setting has an unusable value.
* ``tiercache.store.disk.StoreError`` — a folder is not a usable store.
* ``tiercache.store.index.IndexError_`` — the LMDB index can't be opened or used.
* ``tiercache.store.blockfile.BlockFileError`` — a block file is missing or corrupt.
* ``tiercache.store.restore.RestoreError`` — a record can't be restored.
* ``tiercache.store.layers.UnsupportedCacheError`` — a cache layer class we can't store.
* ``tiercache.chat.render.RenderError`` — a chat can't be rendered by the model's template.
* ``tiercache.admin.interop.InteropError`` — a prompt-cache file can't be exported
  or imported.

Errors that are about a caller's bad argument also derive from ``ValueError``
(``ConfigError``, ``UnsupportedCacheError``, ``RenderError``, ``InteropError``), so code written
against the standard exception keeps working.
"""

from __future__ import annotations


class TiercacheError(Exception):
    """Root of the errors tiercache raises on purpose."""


class ConfigError(TiercacheError, ValueError):
    """A setting (flag, environment variable, argument) has an unusable value."""
