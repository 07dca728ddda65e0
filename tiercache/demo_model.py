"""Deterministic, offline builder for small demo and test models.

The models built here are ordinary mlx-lm model folders (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``, ...)
with seeded random weights, so ``mlx_lm.load(path)`` works without network
access. They exist to exercise tiercache with every cache layer type that
mlx-lm produces:

* ``tiny-llama``: llama, every layer a ``KVCache``.
* ``tiny-hybrid``: lfm2, alternating short-convolution layers
  (``ArraysCache``) and attention layers (``KVCache``).
* ``tiny-sliding``: gemma3_text, sliding-window layers (``RotatingKVCache``
  with a window of 16) alternating with global ``KVCache`` layers.
* ``demo``: a small llama that "talks" (emits tokens, then ``<|im_end|>``).
* ``smollm2-135m`` / ``qwen3-0.6b``: the real shapes of those models for
  memory and throughput experiments (random weights, tokenizer padded).

Everything is deterministic: the same preset and seed give byte-identical
``model.safetensors`` and ``tokenizer.json``.

How the demo model emits EOS: its ``lm_head`` (untied from the embedding)
contains a "successor" map. Tokens are arranged in a random tree rooted at
``<|im_end|>``; the ``lm_head`` row of a token's parent is aligned with the
token's (normalised) embedding, so the next-token argmax mostly follows the
tree towards the root. The transformer layers add context-dependent noise
(so replies differ between prompts), but every path in the tree leads to
``<|im_end|>`` within a few dozen steps.

Usage::

    python -m tiercache.demo_model OUT_DIR --preset demo --seed 0
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PRESETS",
    "TOKENIZER_VOCAB",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_model",
    "default_demo_model_path",
    "param_count",
    "main",
]

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>",
]
"""Special tokens, in id order (ids 0..6). The think and tool-call markers are
single tokens so mlx-lm infers reasoning support and its ``json_tools`` parser."""

EOS_TOKEN = "<|im_end|>"

# ChatML with tools, tool calls, tool results and think blocks, in the style of
# Qwen3 (so mlx-lm's template sniffing picks the ``json_tools`` parser: the
# template names ``<tool_call>`` and ``tool_call.name``). Every piece of output is
# a Jinja string literal, so no stray template whitespace reaches the prompt.
# Differences from Qwen3, chosen for the prefix cache: an assistant message's
# ``reasoning_content`` is always rendered (history renders the same every turn),
# a reply re-renders exactly as it was generated (newlines around the think block
# and before a first tool call are not doubled), and ``enable_thinking=false``
# closes an empty think block in the generation prompt (the default leaves it to
# the model to open one).
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{{ '# Tools\\n\\nYou can call the functions whose JSON signatures are listed "
    "between <tools> and </tools>, one per line:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
    "{{ '\\n</tools>\\n\\nTo call one, reply with a JSON object holding its name "
    "and arguments between <tool_call> and </tool_call>:\\n<tool_call>\\n"
    "{\\\"name\\\": <function name>, \\\"arguments\\\": <arguments object>}\\n"
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages and messages[0]['role'] == 'system' -%}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if message['reasoning_content'] -%}"
    "{{ '<think>\\n' + message['reasoning_content'].strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- set content = (message['content'] or '').lstrip('\\n') -%}"
    "{{ content }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set tool_call = call['function'] if call['function'] is defined else call -%}"
    "{%- if not loop.first or (content and not content.endswith('\\n')) -%}"
    "{{ '\\n' }}{%- endif -%}"
    "{%- set args = tool_call.arguments if tool_call.arguments is string "
    "else (tool_call.arguments | tojson) -%}"
    "{{ '<tool_call>\\n{\\\"name\\\": \\\"' + tool_call.name + '\\\", \\\"arguments\\\": ' "
    "+ args + '}\\n</tool_call>' }}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)

DEMO_MODEL_VERSION = "demo-model-v3"

_LLAMA_COMMON = {
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "float32",
}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        **_LLAMA_COMMON,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 2048,
        "tie_word_embeddings": False,
        # Agentic prompts (a 10-30K-token system prompt plus a conversation) must fit.
        "max_position_embeddings": 32768,
    },
    "tiny-llama": {
        **_LLAMA_COMMON,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "tie_word_embeddings": True,
    },
    "tiny-hybrid": {
        "model_type": "lfm2",
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_ff_dim": 128,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
    "tiny-sliding": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 512,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 16,
        "sliding_window_pattern": 2,
        "max_position_embeddings": 8192,
        "torch_dtype": "float32",
    },
    "smollm2-135m": {
        **_LLAMA_COMMON,
        "rope_theta": 100000.0,
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    # Full Qwen3-0.6B vocabulary: ~0.6 B float32 params (~2.4 GB on disk,
    # ~3.1 GB peak RSS on a 2-core CPU box). Embedding rows beyond the tokenizer's
    # vocabulary are zero.
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "intermediate_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
}
"""Preset name -> ``config.json`` contents (the EOS/BOS ids are added at build)."""

TOKENIZER_VOCAB: dict[str, int] = {
    "demo": 2048,
    "tiny-llama": 512,
    "tiny-hybrid": 512,
    "tiny-sliding": 512,
    "smollm2-135m": 2048,
    "qwen3-0.6b": 2048,
}
"""Preset name -> target size of the trained BPE vocabulary (<= vocab_size)."""

# Presets whose lm_head carries the successor tree that leads to EOS.
_EOS_TREE_PRESETS = {"demo"}

# Names of output projections (writing into the residual stream); they get a
# smaller init so the residual stays dominated by the token embedding.
_OUT_PROJ_SUFFIXES = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "w2.weight")


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def _corpus_lines() -> list[str]:
    """Return the lines of the packaged training corpus."""
    path = Path(__file__).parent / "data" / "corpus.txt"
    return path.read_text(encoding="utf-8").splitlines()


def train_tokenizer(vocab_size: int):
    """Train the byte-level BPE tokenizer on the packaged corpus.

    Training is deterministic for a given corpus and vocabulary size.

    Args:
        vocab_size: Target vocabulary size, special tokens included.

    Returns:
        A ``tokenizers.Tokenizer``; the special tokens have ids 0, 1, 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _corpus_lines()
    # Lines joined with their newline so that "\n" merges are learnt too.
    tok.train_from_iterator([line + "\n" for line in lines], trainer)
    return tok


def _tokenizer_files(vocab_size: int) -> dict[str, str]:
    """Return file name -> text for all tokenizer files."""
    tok = train_tokenizer(vocab_size)
    files = {"tokenizer.json": tok.to_str(pretty=False)}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
    }
    files["tokenizer_config.json"] = json.dumps(cfg, indent=2, sort_keys=True)
    files["special_tokens_map.json"] = json.dumps(special_map, indent=2, sort_keys=True)
    return files


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


def _model_classes(config: dict):
    """Return ``(Model, ModelArgs)`` of the mlx-lm architecture of ``config``."""
    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    return arch.Model, arch.ModelArgs


def _instantiate(config: dict):
    """Instantiate the mlx-lm model (parameters stay lazy, nothing allocated)."""
    model_cls, args_cls = _model_classes(config)
    return model_cls(args_cls.from_dict(config))


def param_count(preset: str) -> int:
    """Count the parameters of a preset without allocating them.

    Args:
        preset: A key of ``PRESETS``.

    Returns:
        The total number of scalar parameters.
    """
    from mlx.utils import tree_flatten

    model = _instantiate(copy.deepcopy(PRESETS[preset]))
    return sum(int(np.prod(v.shape)) for _, v in tree_flatten(model.parameters()))


def _rng(seed: int, name: str) -> np.random.Generator:
    """A generator that depends only on the seed and the parameter name."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def _init_params(model, config: dict, seed: int) -> dict[str, np.ndarray]:
    """Create deterministic float32 values for every parameter of ``model``.

    Matrices (and conv kernels) get ``N(0, 1/fan_in)``; output projections
    are scaled down by ``1/sqrt(2 * n_layers)``; embeddings get ``N(0, 1)``
    scaled by ``1/sqrt(hidden)``; 1-D parameters keep a constant default
    (norm weights) or become zeros (biases).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    n_layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    out: dict[str, np.ndarray] = {}
    for name, value in sorted(tree_flatten(model.parameters())):
        shape = tuple(value.shape)
        if len(shape) == 1:
            if name.endswith("bias"):
                out[name] = np.zeros(shape, np.float32)
                continue
            default = np.array(value.astype(mx.float32))
            if not np.all(default == default.flat[0]):
                raise ValueError(f"unexpected random 1-D parameter {name}")
            out[name] = np.full(shape, default.flat[0], np.float32)
            continue
        rng = _rng(seed, name)
        if name.endswith("embed_tokens.weight"):
            # Untied: unit-RMS rows so the token identity dominates the
            # residual stream (needed by the EOS tree). Tied: keep logits mild.
            std = 1.0 if not config.get("tie_word_embeddings", True) else hidden**-0.5
        else:
            fan_in = int(np.prod(shape[1:]))
            std = fan_in**-0.5
            if name.endswith(_OUT_PROJ_SUFFIXES):
                std /= (2.0 * n_layers) ** 0.5
        out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(
            np.float32
        )
    return out


def _apply_eos_tree(
    params: dict[str, np.ndarray],
    tok_vocab: int,
    eos_id: int,
    seed: int,
    context_ids: tuple[int, ...] = (),
    unprintable_ids: tuple[int, ...] = (),
    window: int = 128,
    strength: float = 8.0,
    noise: float = 0.5,
) -> None:
    """Write the successor tree leading to EOS into an untied ``lm_head``.

    Args:
        params: Parameter dict (modified in place).
        tok_vocab: Number of real tokenizer tokens.
        eos_id: The EOS token id (root of the tree).
        seed: Build seed.
        context_ids: Tokens that end the ChatML generation prompt. Their
            embeddings are shrunk so that, at these positions, the final
            hidden state is driven by the context (attention over the
            prompt) and the first reply token depends on the prompt. They
            get no parent in the tree.
        unprintable_ids: Tokens that never get predicted (stray bytes,
            control characters); they get no parent in the tree.
        window: Each node's parent is drawn among the previous ``window``
            nodes, so depths are about ``2 * position / window``.
        strength: Logit of a token's parent given the token's embedding.
        noise: Standard deviation of the random part of the logits.
    """
    emb = params["model.embed_tokens.weight"]
    vocab, hidden = emb.shape
    rng = _rng(seed, "eos-tree")
    for i in context_ids:
        emb[i] *= np.float32(0.05)
    skip = set(context_ids) | set(unprintable_ids)
    others = [i for i in range(tok_vocab) if i >= len(SPECIAL_TOKENS) and i not in skip]
    order = [eos_id] + [others[i] for i in rng.permutation(len(others))]
    unit = emb / np.sqrt(np.mean(emb * emb, axis=1, keepdims=True))  # RMS-normalised
    head = rng.standard_normal((vocab, hidden), dtype=np.float32) * np.float32(
        noise / hidden**0.5
    )
    for pos in range(1, len(order)):  # parent of order[pos]
        parent = order[int(rng.integers(max(0, pos - window), pos))]
        head[parent] += np.float32(strength / hidden) * unit[order[pos]]
    # Never predict the other special tokens, unprintable tokens or padding.
    head[tok_vocab:] = 0.0
    for i in list(range(len(SPECIAL_TOKENS))) + list(unprintable_ids):
        if i != eos_id:
            head[i] = -strength / hidden**0.5 * unit.mean(axis=0)
    params["lm_head.weight"] = head.astype(np.float32)


def _model_files(
    preset: str,
    seed: int,
    tok_vocab: int,
    out: Path,
    context_ids: tuple[int, ...] = (),
    unprintable_ids: tuple[int, ...] = (),
) -> None:
    """Write ``config.json`` and ``model.safetensors`` of a preset into ``out``."""
    import mlx.core as mx

    config = copy.deepcopy(PRESETS[preset])
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    config["eos_token_id"] = eos_id
    config["bos_token_id"] = SPECIAL_TOKENS.index("<|im_start|>")
    model = _instantiate(config)
    params = _init_params(model, config, seed)
    emb_key = "model.embed_tokens.weight"
    params[emb_key][tok_vocab:] = 0.0  # padding rows beyond the tokenizer
    if preset in _EOS_TREE_PRESETS:
        _apply_eos_tree(params, tok_vocab, eos_id, seed, context_ids, unprintable_ids)
    weights = {k: mx.array(params.pop(k)) for k in sorted(params)}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    del weights
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = {"eos_token_id": eos_id, "bos_token_id": config["bos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def build_model(
    out_dir: str | os.PathLike,
    preset: str = "demo",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a model folder loadable with ``mlx_lm.load``.

    The folder is written into a temporary directory beside ``out_dir`` and
    renamed into place, so readers never see a half-built folder and
    concurrent builders are safe (the loser discards its copy).

    Args:
        out_dir: Destination folder.
        preset: A key of ``PRESETS``.
        seed: Seed of the random weights.
        overwrite: Rebuild even if ``out_dir`` already holds a model.

    Returns:
        The path of the model folder.

    Raises:
        KeyError: If ``preset`` is unknown.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out_dir).expanduser().absolute()
    if (out / "model.safetensors").exists() and not overwrite:
        if _is_current(out, preset, seed):
            return out
        overwrite = True  # built from an older preset or builder: rebuild
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok_vocab = TOKENIZER_VOCAB[preset]
        for name, text in _tokenizer_files(tok_vocab).items():
            (tmp / name).write_text(text, encoding="utf-8")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        gen_prompt = tok.encode("<|im_start|>assistant\n").ids
        context_ids = tuple(sorted({i for i in gen_prompt[-1:] if i >= len(SPECIAL_TOKENS)}))
        n_tok = min(tok_vocab, tok.get_vocab_size())
        unprintable = tuple(
            i
            for i in range(len(SPECIAL_TOKENS), n_tok)
            if not tok.decode([i]).replace(" ", "").isprintable() or "\ufffd" in tok.decode([i])
        )
        _model_files(preset, seed, n_tok, tmp, context_ids, unprintable)
        info = {"preset": preset, "seed": seed, "builder": DEMO_MODEL_VERSION}
        (tmp / "tiercache_demo.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if out.exists():
            if not overwrite and (out / "model.safetensors").exists():
                return out  # somebody else finished first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "model.safetensors").exists():
                raise  # lost a race to a winner: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_current(out: Path, preset: str, seed: int) -> bool:
    """True if ``out`` was built by this builder from this preset's config and seed."""
    try:
        info = json.loads((out / "tiercache_demo.json").read_text())
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    try:
        template = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return False
    want = PRESETS[preset]
    return (
        template == CHAT_TEMPLATE
        and info.get("preset") == preset
        and info.get("seed") == seed
        and info.get("builder") == DEMO_MODEL_VERSION
        and all(config.get(k) == v for k, v in want.items())
    )


def default_demo_model_path() -> Path:
    """Return the shared demo model folder, building it on first use.

    The folder is ``$TIERCACHE_HOME/demo-model-v3`` (default home:
    ``~/.cache/tiercache``).

    Returns:
        The path of the built ``demo`` preset (seed 0).
    """
    home = os.environ.get("TIERCACHE_HOME") or os.path.join("~", ".cache", "tiercache")
    return build_model(Path(home).expanduser() / DEMO_MODEL_VERSION, preset="demo", seed=0)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: build a model folder.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tiercache.demo_model", description="Build a deterministic demo model."
    )
    parser.add_argument("out_dir", help="destination folder")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = build_model(args.out_dir, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
