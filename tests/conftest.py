"""Shared pytest fixtures: small deterministic models built once per session."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from tiercache.demo_model import build_model  # noqa: E402

TEST_SEED = 0


def _build(tmp_path_factory, preset: str) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / preset, preset=preset, seed=TEST_SEED)


def _load(path: Path):
    import mlx_lm

    return mlx_lm.load(str(path))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    """Folder of the ``tiny-llama`` preset (all layers ``KVCache``)."""
    return _build(tmp_path_factory, "tiny-llama")


@pytest.fixture(scope="session")
def tiny_hybrid_path(tmp_path_factory) -> Path:
    """Folder of the ``tiny-hybrid`` preset (lfm2: ArraysCache/KVCache alternating)."""
    return _build(tmp_path_factory, "tiny-hybrid")


@pytest.fixture(scope="session")
def tiny_sliding_path(tmp_path_factory) -> Path:
    """Folder of the ``tiny-sliding`` preset (gemma3_text: RotatingKVCache(16)/KVCache)."""
    return _build(tmp_path_factory, "tiny-sliding")


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory) -> Path:
    """Folder of the ``demo`` preset (talks, emits ``<|im_end|>``)."""
    return _build(tmp_path_factory, "demo")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path):
    """``(model, tokenizer)`` of ``tiny-llama``."""
    return _load(tiny_llama_path)


@pytest.fixture(scope="session")
def tiny_hybrid(tiny_hybrid_path):
    """``(model, tokenizer)`` of ``tiny-hybrid``."""
    return _load(tiny_hybrid_path)


@pytest.fixture(scope="session")
def tiny_sliding(tiny_sliding_path):
    """``(model, tokenizer)`` of ``tiny-sliding``."""
    return _load(tiny_sliding_path)


def random_tokens(n: int, seed: int = 0, vocab: int = 512, low: int = 3) -> list[int]:
    """Deterministic random token ids in ``[low, vocab)`` (skips special ids 0-2)."""
    rng = random.Random(seed)
    return [rng.randrange(low, vocab) for _ in range(n)]


@pytest.fixture
def make_tokens():
    """Factory ``make_tokens(n, seed=0, vocab=512, low=3) -> list[int]``."""
    return random_tokens


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh real ``redis-server`` on a free loopback port (skips, saying why,
    only when the binary is missing)."""
    from redis_helpers import MISSING, REDIS_BIN, RedisServer

    if REDIS_BIN is None:
        pytest.skip(MISSING)
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield srv
    finally:
        srv.stop()
