"""The real server, with block-file writes held until a gate file exists.

Fault injection for the pending-tier HTTP test: a disk that stalls. Only the
write function is replaced; everything else is the unmodified server. Run as
``python -m tests.stalled_disk_server`` with ``TIERCACHE_TEST_DISK_GATE`` set.
"""

from __future__ import annotations

import os
import sys
import time

import tiercache.store.disk as disk_mod
from tiercache.server.cli import main

_GATE = os.environ["TIERCACHE_TEST_DISK_GATE"]
_real_write = disk_mod.write_tensor_file


def _held_write(*args, **kwargs):
    deadline = time.monotonic() + 120
    while not os.path.exists(_GATE) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _real_write(*args, **kwargs)


disk_mod.write_tensor_file = _held_write

if __name__ == "__main__":
    sys.exit(main())
