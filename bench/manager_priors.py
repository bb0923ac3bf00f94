"""How much does the manager's first decision depend on the state? P("new") at the decision slot, per kind.

    python bench/manager_priors.py --split val                   # the base SmolLM2, the cpu preset's states
    python bench/manager_priors.py --model runs/grpo-manager/checkpoint
    python bench/manager_priors.py --smoke --model CKPT          # 1 conversation (the test suite runs it)

In the "ops" format the first choice of each entry is its "about" slot: "new" (then ADD) or the first
token of a shown memory's text. For each gym state (agents.manager_examples, as train.py builds them:
oracle banks, the 2 most similar memories shown, guided), the forced prefix is followed to that slot and
the policy's distribution there, over the tokens the format allows, is split into P(new) and P(a memory).

GRPO's first steps move a shared prior: a shift b of the "new" logit, the same on every state. Greedy
decoding says "new" where log P(new) - log P(memory) + b > 0, so the share of ADD states answered "new"
and of memory states answered with a memory, swept over b, is what a bias alone can reach; anything
better has to come from the policy telling the states apart (the AUC of P(new), ADD against change
states: 0.5 is no information). Settings are read on train and val, never on test.
"""

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data.gym as gym  # noqa: E402
from agents import conversation_facts, manager_examples, oracle_kind  # noqa: E402
from memory import make_embedder  # noqa: E402
from metrics import standard_error  # noqa: E402
from model import OFFLINE_SMOLLM2, load_model  # noqa: E402


@torch.no_grad()
def log_odds_new(model, tok, example) -> float:
    """log P(new) - log P(a memory) at the example's first choice, under its guide (temperature 1)."""
    guide, state, ids = example.guide, example.guide.start, list(example.prompt)
    while True:  # the forced run: exactly one allowed token at each position
        allowed = guide.allowed(state)
        if int(allowed.sum()) != 1:
            break
        token = int(allowed.nonzero()[0, 0])
        ids.append(token)
        state = guide.advance(state, token)
    logits = model(torch.tensor([ids]), last_only=True)[0, -1].float()  # [V]
    logp = torch.log_softmax(logits.masked_fill(~allowed, -math.inf), -1)
    choices = allowed.nonzero()[:, 0].tolist()
    is_new = torch.tensor(['new"'.startswith(tok.decode([t])) for t in choices])
    lp = logp[choices]
    return float(torch.logsumexp(lp[is_new], 0) - torch.logsumexp(lp[~is_new], 0))


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties half (the Mann-Whitney statistic)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=OFFLINE_SMOLLM2, help="the manager's policy (a checkpoint or the base)")
    ap.add_argument("--split", choices=("train", "val"), default="val")
    ap.add_argument("--limit", type=int, default=0, help="conversations (0: all of the split)")
    ap.add_argument("--manager-k", type=int, default=2, help="memories shown per fact (the cpu preset's 2)")
    ap.add_argument("--embedder", default="minilm", help="the manager's retrieval (the cpu preset's minilm)")
    ap.add_argument("--smoke", action="store_true", help="one conversation")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(args.model)
    convs = [c for c in gym.load_conversations() if gym.split_of(c.sample_id) == args.split]
    convs = convs[:1] if args.smoke else convs[:args.limit or None]
    embedder = make_embedder(args.embedder)
    by_kind = defaultdict(list)
    for conv in convs:
        for ex in manager_examples(conv, [], conversation_facts(conv, "observation"), tok, embedder, k=args.manager_k,
                                   vocab_size=model.lm_head.weight.shape[0], fmt="ops"):
            if not ex.meta["id_map"]:  # an empty bank: "new" is the only choice (run_manager ADDs without asking)
                continue
            by_kind[oracle_kind(ex)].append(log_odds_new(model, tok, ex))
    print(f"{args.model}, gym {args.split}: {len(convs)} conversations, {sum(map(len, by_kind.values()))} states")
    print("| oracle kind | states | mean P(new) | median log-odds new |\n|---|---|---|---|")
    for kind, xs in sorted(by_kind.items()):
        ps = [1 / (1 + math.exp(-x)) for x in xs]
        print(f"| {kind} | {len(xs)} | {sum(ps) / len(ps):.3f} +- {standard_error(ps):.3f} | "
              f"{sorted(xs)[len(xs) // 2]:+.2f} |")
    add, change = by_kind.get("ADD", []), by_kind.get("UPDATE change", [])
    if add and change:
        print(f"AUC of P(new), ADD against UPDATE change states: {auc(add, change):.3f}")
        print("| shift b of the new logit | ADD states answered new | change states answered with a memory |")
        print("|---|---|---|")
        rates = {b: (sum(x + b > 0 for x in add) / len(add), sum(x + b <= 0 for x in change) / len(change))
                 for b in sorted({-x for x in add + change} | {i / 2 for i in range(-8, 9)})}
        best = max(rates, key=lambda b: min(rates[b]))  # the shift that does best on the worse of the two
        for b in sorted({i / 2 for i in range(-8, 9)} | {best}):
            print(f"| {b:+.2f}{' (best)' if b == best else ''} | {rates[b][0]:.2f} | {rates[b][1]:.2f} |")


if __name__ == "__main__":
    main()
