"""Tests of the deterministic demo/test model builder and the shared helpers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx_lm
import pytest
from mlx_helpers import cold_greedy, first_logits, greedy_continue, prefill
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from tiercache import demo_model
from tiercache.demo_model import PRESETS, build_model, param_count

ROOT = Path(__file__).resolve().parent.parent
DETERMINISTIC_FILES = ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json")


def _digests(path: Path) -> dict[str, str]:
    return {n: hashlib.sha256((path / n).read_bytes()).hexdigest() for n in DETERMINISTIC_FILES}


def _classes(model) -> list[type]:
    return [type(c) for c in make_prompt_cache(model)]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_hybrid", "tiny_sliding"])
def test_load_and_stream_generate(request, name):
    model, tok = request.getfixturevalue(name)
    assert tok.eos_token_ids == {2}
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                     add_generation_prompt=True)
    responses = list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=8,
                                            sampler=make_sampler(0.0)))
    assert 1 <= len(responses) <= 8
    assert responses[-1].finish_reason in ("stop", "length")


def test_cache_layer_layouts(tiny_llama, tiny_hybrid, tiny_sliding):
    assert _classes(tiny_llama[0]) == [KVCache, KVCache]
    assert _classes(tiny_hybrid[0]) == [ArraysCache, KVCache, ArraysCache, KVCache]
    assert _classes(tiny_sliding[0]) == [RotatingKVCache, KVCache, RotatingKVCache, KVCache]
    assert make_prompt_cache(tiny_sliding[0])[0].max_size == 16


def test_sliding_cache_wraps(tiny_sliding, make_tokens):
    model, _ = tiny_sliding
    cache = make_prompt_cache(model)
    prefill(model, make_tokens(40, seed=1), cache, step=7)
    assert cache[0].offset == 40 and cache[0].keys.shape[2] <= 40
    assert cache[1].offset == 40


def test_chat_template_is_chatml(tiny_llama):
    _, tok = tiny_llama
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok.decode(tok.encode("The quick cache.", add_special_tokens=False)) == "The quick cache."


def test_build_is_deterministic(tmp_path, tiny_hybrid_path):
    a = build_model(tmp_path / "a", preset="tiny-hybrid", seed=0)
    b = build_model(tmp_path / "b", preset="tiny-hybrid", seed=0)
    assert _digests(a) == _digests(b) == _digests(tiny_hybrid_path)
    c = build_model(tmp_path / "c", preset="tiny-hybrid", seed=1)
    assert _digests(c)["model.safetensors"] != _digests(a)["model.safetensors"]
    assert _digests(c)["tokenizer.json"] == _digests(a)["tokenizer.json"]


def test_build_is_deterministic_across_processes(tmp_path, tiny_llama_path):
    env = dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(ROOT))
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "tiercache.demo_model", str(out), "--preset",
                    "tiny-llama"], check=True, env=env, cwd=tmp_path, capture_output=True)
    assert _digests(out) == _digests(tiny_llama_path)


def test_build_atomic_and_overwrite(tmp_path):
    out = build_model(tmp_path / "m", preset="tiny-llama")
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert build_model(out, preset="tiny-llama") == out  # existing: kept
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    build_model(out, preset="tiny-llama", seed=3, overwrite=True)
    assert json.loads((out / "tiercache_demo.json").read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp leftovers
    with pytest.raises(KeyError):
        build_model(tmp_path / "x", preset="nope")


def test_default_demo_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERCACHE_HOME", str(tmp_path))
    path = demo_model.default_demo_model_path()
    assert path == tmp_path / "demo-model-v3"
    assert (path / "model.safetensors").exists()
    assert demo_model.default_demo_model_path() == path


def test_demo_emits_eos_greedily(demo_model_path):
    model, tok = mlx_lm.load(str(demo_model_path))
    prompts = ["Hello, how are you?", "What is the capital of France?",
               "Write a poem about the sea.", "def add(a, b):", "Tell me a joke",
               "Why is the sky blue?"]
    replies = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}],
                                      add_generation_prompt=True)
        out = list(mlx_lm.stream_generate(model, tok, ids, max_tokens=64,
                                          sampler=make_sampler(0.0)))
        assert out[-1].finish_reason == "stop", p
        assert out[-1].token == 2
        assert len(out) >= 2  # says something before stopping
        replies.append(tuple(r.token for r in out))
    assert len(set(replies)) >= 3  # replies depend on the prompt


@pytest.mark.parametrize("preset,expected", [
    ("smollm2-135m", 134_515_008),
    ("qwen3-0.6b", 596_049_920),
])
def test_big_preset_shapes(preset, expected):
    assert param_count(preset) == expected


def test_all_presets_float32_and_instantiable():
    for name, cfg in PRESETS.items():
        assert cfg["torch_dtype"] == "float32"
        assert param_count(name) > 0
    assert PRESETS["tiny-llama"]["head_dim"] == 16


@pytest.mark.parametrize("name,step", [("tiny_llama", 5), ("tiny_hybrid", 5),
                                       ("tiny_sliding", 5)])
def test_helpers(request, name, step, make_tokens):
    model, _ = request.getfixturevalue(name)
    toks = make_tokens(23, seed=7)
    assert make_tokens(23, seed=7) == toks and all(3 <= t < 512 for t in toks)
    cold = cold_greedy(model, toks, 6)
    assert len(cold) == 6 and cold == cold_greedy(model, toks, 6)
    # Prefix in one cache, continuation afterwards == one-shot (same chunking).
    cache = make_prompt_cache(model)
    prefill(model, toks[:step], cache)
    assert greedy_continue(model, cache, toks[step:], 6) == cold_greedy(
        model, toks, 6, step=None) or name == "tiny_hybrid"
    chunked = cold_greedy(model, toks, 6, step=step)
    assert len(chunked) == 6
    c1, c2 = make_prompt_cache(model), make_prompt_cache(model)
    prefill(model, toks, c1, step=step)
    prefill(model, toks, c2, step=step)
    a, b = first_logits(model, c1, [5, 6]), first_logits(model, c2, [5, 6])
    assert a.shape == (512,) and (a == b).all()
