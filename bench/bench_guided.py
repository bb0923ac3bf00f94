"""The cost of guided decoding: a decode step with a format's token mask against the same step without one.

    python bench/bench_guided.py                     # SmolLM2-135M-Instruct, the manager format, batch 1 and 16
    python bench/bench_guided.py --smoke --model CKPT    # the smallest setting (the test suite runs it)

Both runs sample the same number of new tokens (stop ids switched off) from the Memory Manager's prompt at
temperature 1; guided and unguided runs alternate round by round and the best of --repeats is kept (this
machine's speed drifts). "cold" is the first guided run, which also computes each new state's mask once
(grammar.Guide caches them per format and vocabulary); "warm" reuses them, as every call after the first in
a training run or an evaluation does. Also prints the guide's own work per step (stacking the rows'
masks, masking the logits, advancing each row's state) timed alone on the tokens the guided run drew.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import prompts as P  # noqa: E402
from grammar import guide_for  # noqa: E402
from sampling import allowed_rows, generate  # noqa: E402

MEMORIES = [{"id": str(i), "text": t} for i, t in enumerate(
    ["Melanie adopted a dog named Buddy", "Melanie lives in Boston", "Caroline paints landscapes",
     "Melanie went camping with her family in June 2023", "Caroline attended an LGBTQ support group"])]
FACTS = ["Melanie adopted another dog named Scout", "Melanie moved to Denver"]


def best_of(fns, repeats):
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def guide_work_s(g, rows: list[list[int]], vocab_size: int) -> float:
    """Seconds per step of the guide alone, replaying the rows' tokens: masks, masked_fill, advance."""
    states = [g.start] * len(rows)
    logits = torch.zeros(len(rows), vocab_size)
    steps = min(map(len, rows))
    t0 = time.perf_counter()
    for t in range(steps):
        allowed = allowed_rows([g] * len(rows), states, vocab_size, logits.device)
        logits.masked_fill(~allowed, float("-inf"))
        states = [g.advance(s, r[t]) for s, r in zip(states, rows)]
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: batch 1 and 2, 8 tokens, once")
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.new_tokens, args.repeats = "1,2", 8, 1
    net, tok = M.load_model(args.model)
    V = net.lm_head.weight.shape[0]
    prompt = tok.chat(P.manager_messages(MEMORIES, FACTS))
    automaton = P.manager_automaton(len(MEMORIES) + len(FACTS))
    print(f"{args.model}: manager prompt of {len(prompt)} tokens, {args.new_tokens} new tokens, vocabulary {V}")
    print("| batch | unguided ms/token | guided cold ms/token | guided warm ms/token | guide alone ms/step | "
          "warm overhead |")
    print("|---|---|---|---|---|---|")
    for B in map(int, args.batches.split(",")):
        automaton._guides.clear()  # cold: no mask computed yet for this vocabulary
        g = guide_for(automaton, net, tok, True)
        t0 = time.perf_counter()
        rows = generate(net, [prompt] * B, args.new_tokens, seed=0, stop_ids=(), guide=g)
        cold = time.perf_counter() - t0

        def free():
            generate(net, [prompt] * B, args.new_tokens, seed=0, stop_ids=())

        def guided():
            generate(net, [prompt] * B, args.new_tokens, seed=0, stop_ids=(), guide=g)
        t_free, t_guided = best_of([free, guided], args.repeats)
        alone = guide_work_s(g, rows, V)
        per = 1e3 / args.new_tokens
        share = 100 * alone * args.new_tokens / t_free
        print(f"| {B} | {t_free * per:.1f} | {cold * per:.1f} | {t_guided * per:.1f} | {alone * 1e3:.2f} | "
              f"{100 * (t_guided - t_free) / t_free:+.1f}% (guide alone {share:.1f}%) |", flush=True)
        print(f"  {len(g._masks)} states visited; a guided sample: {tok.decode(rows[0])[:100]!r}", flush=True)


if __name__ == "__main__":
    main()
