"""Seeded synthetic agentic trace: sessions sharing a system prompt, interleaved turns.

Shape (defaults follow the issue): one system prompt of 4-8K tokens shared by 4
sessions; each session has 10 turns; a turn appends 300-800 tokens of tool output
to the session's history, then the model "generates" 100-200 tokens which also
join the history. Sessions are interleaved at random (seeded), each session's
turns staying in order. Token ids are random in ``[3, vocab)`` (ids 0-2 are the
demo tokenizer's special tokens).

    python -m tiercache.tools.bench.trace --seed 0 --out trace.json [--quick]

A turn's prompt is ``system + history + tool output``; its cache after the turn
covers ``prompt + generated``, which is a prefix of the session's next prompt.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass, field


@dataclass
class TraceSpec:
    sessions: int = 4
    turns: int = 10
    system: tuple[int, int] = (4096, 8192)
    tool: tuple[int, int] = (300, 800)
    generated: tuple[int, int] = (100, 200)
    vocab: int = 2048
    seed: int = 0


QUICK = TraceSpec(sessions=3, turns=4, system=(256, 512), tool=(40, 100), generated=(10, 30))


@dataclass
class Turn:
    index: int  # position in the interleaved trace
    session: int
    turn: int  # turn number within the session
    prompt: list[int] = field(repr=False)  # full prompt of this turn
    generated: list[int] = field(repr=False)  # tokens the model "generates" (forced)
    new_tokens: int = 0  # tool-output tokens added by this turn


def generate(spec: TraceSpec) -> list[Turn]:
    rng = random.Random(spec.seed)

    def toks(lo_hi):
        n = rng.randint(*lo_hi)
        return [rng.randrange(3, spec.vocab) for _ in range(n)]

    system = toks(spec.system)
    history = [list(system) for _ in range(spec.sessions)]
    per_session = []
    for s in range(spec.sessions):
        turns = []
        for t in range(spec.turns):
            tool = toks(spec.tool)
            gen = toks(spec.generated)
            turns.append((tool, gen))
        per_session.append(turns)
    # interleave: pick a random session that still has turns
    order = []
    left = [spec.turns] * spec.sessions
    while any(left):
        s = rng.choice([i for i in range(spec.sessions) if left[i]])
        order.append(s)
        left[s] -= 1
    out = []
    nxt = [0] * spec.sessions
    for i, s in enumerate(order):
        t = nxt[s]
        nxt[s] += 1
        tool, gen = per_session[s][t]
        prompt = history[s] + tool
        history[s] = prompt + gen
        out.append(Turn(i, s, t, prompt, gen, len(tool)))
    return out


def summary(turns: list[Turn]) -> dict:
    return {
        "turns": len(turns),
        "sessions": len({t.session for t in turns}),
        "prompt_tokens_total": sum(len(t.prompt) for t in turns),
        "new_tokens_total": sum(t.new_tokens for t in turns),
        "generated_total": sum(len(t.generated) for t in turns),
        "max_prompt": max(len(t.prompt) for t in turns),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write the trace as JSON")
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else TraceSpec()
    spec = TraceSpec(**{**asdict(spec), "seed": args.seed})
    turns = generate(spec)
    print(json.dumps({"spec": asdict(spec), **summary(turns)}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"spec": asdict(spec), "turns": [asdict(t) for t in turns]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
