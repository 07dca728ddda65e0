"""``tiercache-server`` whose sampler picks scripted tokens (fault injection for tests).

Random-weight models never emit a tool call, so to prove the tool-call response
path end to end this entry point replaces ONLY the token choice: the real server
process, HTTP stack, model forward passes, streaming detokenizer, output parser
and cache all run as in production. ``TIERCACHE_TEST_SCRIPTS`` is a JSON list of
texts; a request's ``seed`` picks the text, which the model's real tokenizer turns
into the tokens the sampler returns one per step (then EOS).

Run as ``python -m tests.scripted_server`` with the usual server flags.
"""

from __future__ import annotations

import json
import os
import sys

import mlx.core as mx
from tiercache.server import engine as engine_module
from tiercache.server.cli import main

_tokenizers: dict = {}


def _tokenizer():
    from pathlib import Path

    from mlx_lm.tokenizer_utils import load

    path = os.environ["TIERCACHE_TEST_MODEL"]
    if path not in _tokenizers:
        _tokenizers[path] = load(Path(path))
    return _tokenizers[path]


def scripted_sampler(p):
    """Return a sampler emitting the tokens of script number ``p.seed``, then EOS."""
    tok = _tokenizer()
    script = json.loads(os.environ["TIERCACHE_TEST_SCRIPTS"])[p.seed or 0]
    eos = min(tok.eos_token_ids)
    ids = iter(tok.encode(script, add_special_tokens=False))

    def sample(logprobs: mx.array) -> mx.array:
        return mx.array([next(ids, eos)] * logprobs.shape[0], dtype=mx.uint32)

    return sample


engine_module.make_token_sampler = scripted_sampler

if __name__ == "__main__":
    sys.exit(main())
