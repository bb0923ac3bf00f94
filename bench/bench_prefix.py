"""Prefix caching, measured: tokens computed, seconds and GFLOP/s for the main command's step and evaluate.py's
manager calls, against this machine's float32 peak.

    python bench/bench_prefix.py                                    # the step, then the manager's calls (base model)
    python bench/bench_prefix.py --manager runs/grpo-manager/checkpoint    # the README's manager (its head decides)
    python bench/bench_prefix.py --smoke --model CKPT               # the smallest setting (the test suite runs it)

It uses only functions that 1fc7403 has too (generate, the loss pass, manager.run_managers), so copied into a
checkout of that commit it measures the code before prefix caching on the same machine (docs/speed.md).
Tokens computed: every token row that enters the network (a tok_emb lookup): prefill, decode steps, loss passes,
padding included. GFLOP/s counts the linear layers only, 2 FLOPs per weight per token forward, 3 forward's worth
with gradients (4 with activation checkpointing); attention and the LM head are left out, so it is a lower bound.
The float32 peak: cores x 2 FMA units x SIMD lanes (16 with AVX-512, 8 with AVX2) x 2 FLOPs x the clock that
/proc/cpuinfo reports; the roof a large product reaches here is printed beside it.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flags  # noqa: E402
import model as M  # noqa: E402
from agents import DATASETS, answer_task, conversation_facts, manager_format_of, trained_setting  # noqa: E402
from decision import load_head  # noqa: E402
from manager import run_managers  # noqa: E402
from memory import make_embedder  # noqa: E402
from sampling import generate  # noqa: E402


def float32_peak() -> tuple[float, str]:
    """(GFLOP/s, how): cores x 2 FMA units x lanes x 2 x clock, from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lanes = 16 if " avx512f" in info else 8 if " avx2" in info else 4
    mhz = max((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), default=0.0)
    cores = torch.get_num_threads()
    name = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return cores * 2 * lanes * 2 * mhz / 1e3, f"{name}: {cores} cores x 2 FMA x {lanes} lanes x 2 x {mhz:.0f} MHz"


def product_roof() -> float:
    """GFLOP/s of a large float32 product (2048 x 2304 x 2304), best of 3."""
    a, b = torch.randn(2048, 2304), torch.randn(2304, 2304)
    best = min(timed(lambda: a @ b)[0] for _ in range(3))
    return 2 * 2048 * 2304 * 2304 / best / 1e9


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Counter:
    """Token rows entering the network (tok_emb lookups) while installed."""

    def __init__(self, model):
        self.n = 0
        self.hook = model.tok_emb.register_forward_hook(lambda mod, args, out: self.add(args[0].numel()))

    def add(self, n):
        self.n += n


def report(name: str, seconds: float, tokens: int, flops_per_token: float, passes: float, peak: float) -> None:
    gflops = tokens * flops_per_token * passes / seconds / 1e9
    print(f"  {name:34s} {seconds:7.2f} s  {tokens:8d} tokens  {gflops:6.1f} GFLOP/s ({100 * gflops / peak:4.1f} % of "
          f"peak)  peak RSS so far {peak_rss_gb():.2f} GiB", flush=True)


def loss_pass(model, prompts, groups, checkpoint: bool):
    """Every group's log-probs: one call where the code has the minibatch pass, else one per group (1fc7403)."""
    if hasattr(model, "group_logprobs"):
        return [lp for lp, _ in model.group_logprobs(prompts, groups, 1.0, checkpoint)]
    return [model.logprobs(p, g, 1.0, checkpoint)[0] for p, g in zip(prompts, groups)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2, help="the policy (and, without --manager, the manager)")
    ap.add_argument("--manager", default=None, help="a manager checkpoint (its decision head decides, if it has one)")
    ap.add_argument("--conversations", type=int, default=8, help="gym test conversations for the manager's calls")
    ap.add_argument("--smoke", action="store_true", help="one question, G = 2, 2 tokens, one conversation")
    args = ap.parse_args()
    peak, how = float32_peak()
    print(f"float32 peak {peak:.0f} GFLOP/s ({how}); a large product reaches {product_roof():.0f} GFLOP/s here")
    policy, tok = M.load_model(args.model)
    per_token = 2 * sum(m.weight.numel() for name, m in policy.named_modules()
                        if isinstance(m, torch.nn.Linear) and name != "lm_head")
    settings = flags.parse_args(["--preset", "cpu"])
    Q, G, new, val = (1, 2, 2, 2) if args.smoke else (settings.questions_per_step, settings.group_size,
                                                    settings.max_new_tokens, settings.val_batch)
    task = answer_task(settings, tok, policy)
    ref = M.load_model(args.model)[0]
    counter = Counter(policy)
    ref_counter = Counter(ref)

    print(f"the main command's step ({Q} questions x G = {G}, {new} new tokens; validation: {val} prompts)")
    chunk = task.train[:Q]
    prompts = [ex.prompt for ex in chunk for _ in range(G)]
    seconds, (groups, _) = timed(lambda: generate(policy, prompts, new, settings.temperature, seed=0,
                                                  return_logprobs=True, guide=[ex.guide for ex in chunk for _ in range(G)]))
    report("rollout: sampling", seconds, counter.n, per_token, 1, peak)
    groups = [[c or [tok.stop_ids[0]] for c in groups[i * G:(i + 1) * G]] for i in range(Q)]
    with torch.no_grad():
        seconds, _ = timed(lambda: loss_pass(ref, [ex.prompt for ex in chunk], groups, True))
    report("rollout: the reference's log-probs", seconds, ref_counter.n, per_token, 1, peak)
    for checkpoint in (True, False):
        counter.n = 0
        policy.zero_grad(set_to_none=True)
        seconds, _ = timed(lambda: sum(lp.sum() for lp in loss_pass(policy, [ex.prompt for ex in chunk], groups,
                                                                      checkpoint)).backward())
        report(f"update: loss pass + backward{' (ckpt)' if checkpoint else ''}", seconds, counter.n, per_token,
               4 if checkpoint else 3, peak)
    counter.n = 0
    policy.zero_grad(set_to_none=True)
    examples = task.val[:val]
    seconds, _ = timed(lambda: generate(policy, [ex.prompt for ex in examples], new, temperature=0,
                                        guide=[ex.guide for ex in examples]))
    report("validation: greedy answers", seconds, counter.n, per_token, 1, peak)

    manager = policy if args.manager is None else M.load_model(args.manager)[0]
    if args.manager is not None:
        load_head(manager, args.manager)
    embedder = make_embedder("hash" if args.smoke else "minilm", manager, tok)
    dataset = DATASETS["gym"]
    wanted = list(dict.fromkeys(q.conv_id for q in dataset.load_split("test")))[:1 if args.smoke else args.conversations]
    convs = [c for c in dataset.load_conversations() if c.sample_id in wanted]
    facts = [conversation_facts(c, "observation", manager, tok, guided=True) for c in convs]
    if args.smoke:
        facts = [f[:6] for f in facts]
    counter = Counter(manager)
    stats = {}
    k = trained_setting(args.manager, "manager_k", 2) if args.manager else 2
    fmt = manager_format_of(args.manager, "ops") if args.manager else "ops"
    seconds, _ = timed(lambda: run_managers(convs, facts, manager, tok, embedder, k, 2 if args.smoke else 64, stats,
                                            progress=False, guided=True, fmt=fmt))
    calls = sum(v for k, v in stats.get("decisions", {}).items() for v in v.values()) if stats.get("decisions") else 0
    print(f"evaluate.py's manager calls ({len(convs)} conversations, {calls} decisions on the gym's turns)")
    report("manager calls", seconds, counter.n, per_token, 1, peak)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
