"""How far batched decoding drifts from decoding alone (greedy, same model).

    python -m tiercache.tools.bench.batch_logits [--model DIR] [--steps 40]

Runs prompts of different lengths through mlx-lm's ``BatchGenerator`` (the
class ``tiercache-server`` batches with) together, and each one alone through
``generate_step``, greedily. Reports, per prompt, whether the generated tokens
agree and the largest absolute difference of the log-probabilities over the
whole vocabulary at every step where both runs had fed the same tokens. The
difference comes from float summation order (padded, batched matmuls), not
from the cache: both runs start cold.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def prompts_of_lengths(lengths: Sequence[int], vocab: int, seed: int = 0) -> list[list[int]]:
    """Return one seeded random prompt (ids >= 3: no special tokens) per length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in lengths]


def alone(model, prompt: list[int], steps: int) -> tuple[list[int], list]:
    """Greedy tokens and log-probabilities of ``prompt`` decoded alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    tokens, logprobs = [], []
    for tok, lp in generate_step(mx.array(prompt), model, max_tokens=steps):
        tokens.append(int(tok))
        logprobs.append(lp)
    return tokens, logprobs


def batched(model, prompts: list[list[int]], steps: int) -> list[tuple[list[int], list]]:
    """Greedy tokens and log-probabilities of ``prompts`` decoded in one batch."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=steps, prefill_batch_size=len(prompts),
                         completion_batch_size=len(prompts))
    uids = gen.insert(prompts, max_tokens=[steps] * len(prompts))
    out = {u: ([], []) for u in uids}
    try:
        while any(len(out[u][0]) < steps for u in uids):
            for r in gen.next_generated():
                out[r.uid][0].append(int(r.token))
                out[r.uid][1].append(r.logprobs)
    finally:
        gen.close()
    return [out[u] for u in uids]


def compare(model, prompts: list[list[int]], steps: int) -> list[dict]:
    """Decode ``prompts`` batched and alone; report agreement per prompt.

    Returns:
        Per prompt: ``prompt_tokens``, ``same_tokens`` (all ``steps`` agree),
        ``agreeing_steps`` and ``max_logprob_diff`` (over agreeing steps).
    """
    import mlx.core as mx

    rows = []
    for prompt, (b_tok, b_lp) in zip(prompts, batched(model, prompts, steps)):
        a_tok, a_lp = alone(model, prompt, steps)
        n = 0
        worst = 0.0
        for i in range(min(len(a_tok), len(b_tok))):
            worst = max(worst, float(mx.max(mx.abs(a_lp[i] - b_lp[i].reshape(a_lp[i].shape)))))
            if a_tok[i] != b_tok[i]:
                break
            n += 1
        rows.append({"prompt_tokens": len(prompt), "same_tokens": a_tok == b_tok,
                     "agreeing_steps": n, "max_logprob_diff": worst})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the comparison as JSON (one object per batch size)."""
    from mlx_lm import load

    from tiercache.demo_model import default_demo_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="mlx-lm model folder (default: demo model)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lengths", default="7,130,900,33,260,1500,64,12",
                    help="comma-separated prompt lengths; batches use the first 3 and all")
    args = ap.parse_args(argv)
    model, tok = load(args.model or str(default_demo_model_path()))
    lengths = [int(x) for x in args.lengths.split(",")]
    prompts = prompts_of_lengths(lengths, len(tok.vocab) if hasattr(tok, "vocab") else 2048)
    report = {}
    for size in sorted({min(3, len(prompts)), len(prompts)}):
        rows = compare(model, prompts[:size], args.steps)
        report[f"batch_of_{size}"] = {
            "rows": rows,
            "all_same_tokens": all(r["same_tokens"] for r in rows),
            "max_logprob_diff": max(r["max_logprob_diff"] for r in rows),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
