"""The shared remote tier on Redis/Valkey: a third tier after memory and disk.

* :mod:`.codec` — one key per record (header + tokens + block file bytes) and the
  checks a remote hit must pass.
* :mod:`.client` — bounded, breaker-guarded Redis calls.
* :mod:`.tier` — :class:`RemoteTier`: chain lookups and background pushes.
* :mod:`.stats` — what a remote holds, per namespace (the CLI).

The store (``tiercache.store``) never imports this package.
"""

from .tier import RemoteTier

__all__ = ["RemoteTier"]
