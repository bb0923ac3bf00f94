"""How much does the manager's first decision depend on the state? P("new") at the decision slot, per kind.

    python bench/manager_priors.py --split val                   # the base SmolLM2, the cpu preset's states
    python bench/manager_priors.py --model runs/grpo-manager/checkpoint
    python bench/manager_priors.py --smoke --model CKPT          # 1 conversation (the test suite runs it)
    python bench/manager_priors.py --split val --no-demos        # the prompt without its worked examples
    python bench/manager_priors.py --model runs/mgr-head/checkpoint   # with its decision head (decision.py)
    python bench/manager_priors.py --split val --which-memory    # and which memory the LM names after the decision
    python bench/manager_priors.py --model RUN/checkpoint --split val --family 1 --manager-k 1   # val, other words

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
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data.gym as gym  # noqa: E402
from data.locomo import parse_conversation  # noqa: E402
import prompts  # noqa: E402
from agents import conversation_facts, manager_examples, oracle_kind  # noqa: E402
from decision import ForcedArm, load_head, slot, slot_states  # noqa: E402
from memory import make_embedder  # noqa: E402
from metrics import standard_error  # noqa: E402
from model import OFFLINE_SMOLLM2, load_model  # noqa: E402
from sampling import generate  # noqa: E402


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties half (the Mann-Whitney statistic)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def split_conversations(split: str, limit: int, families=None) -> list:
    """The gym split's conversations (the first `limit`; 0: all); with `families`, its worlds worded by each of them
    in turn (gym.FAMILIES: the same events in other words)."""
    if families is None:
        return [c for c in gym.load_conversations() if gym.split_of(c.sample_id) == split][:limit or None]
    out = []
    for f in families:
        out += [parse_conversation(c) for c in gym.generate_split(split, gym.Level(family=f))][:limit or None]
    return out


def decision_states(model, tok, convs: list, manager_k: int, embedder) -> dict:
    """oracle kind -> [(log-odds of new, hidden state at the decision slot)] over the conversations' gym states: the
    LM's log-odds L at temperature 1 (decision.slot_states), plus s(h) for a manager trained with a decision head."""
    kinds, slots = [], []
    for conv in convs:
        for ex in manager_examples(conv, [], conversation_facts(conv, "observation"), tok, embedder, k=manager_k,
                                   vocab_size=model.lm_head.weight.shape[0], fmt="ops"):
            s = slot(ex.prompt, ex.guide, prompts.decision_marker(tok))
            if s is not None:  # None: an empty bank, "new" is the only choice (run_manager ADDs without asking)
                kinds.append(oracle_kind(ex))
                slots.append(s)
    L, h = slot_states(model, slots)  # [N], [N, dim]
    if getattr(model, "decision_head", None) is not None:
        with torch.no_grad():
            L = L + model.decision_head(h)
    by_kind = defaultdict(list)
    for kind, odds, hidden in zip(kinds, L.tolist(), h):
        by_kind[kind].append((odds, hidden))
    return by_kind


def linear_probe(train_by_kind: dict, val_by_kind: dict, l2: float = 1e-2) -> tuple[float, float]:
    """Can the state at the decision slot tell ADD from change states at all? A logistic regression on the
    hidden states (the direction the LM head could learn), fit on train, AUC on train and val."""
    def xy(by_kind):
        pos, neg = [h for _, h in by_kind.get("ADD", [])], [h for _, h in by_kind.get("UPDATE change", [])]
        return torch.stack(pos + neg), torch.tensor([1.0] * len(pos) + [0.0] * len(neg))

    x, y = xy(train_by_kind)
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardised features: the L2 penalty treats them alike
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = ((x - mean) / std) @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)

    def probe_auc(by_kind):
        xs, ys = xy(by_kind)
        z = (((xs - mean) / std) @ w + b).detach().tolist()
        return auc([s for s, t in zip(z, ys) if t], [s for s, t in zip(z, ys) if not t])

    return probe_auc(train_by_kind), probe_auc(val_by_kind)


@torch.no_grad()
def memory_picks(model, tok, split: str, limit: int, manager_k: int, embedder, most: int = 0, batch: int = 8) -> dict:
    """Which memory does the frozen LM name once the decision is "a memory"? oracle kind -> [(is the memory to
    change the most similar one shown, does greedy decoding, made to take the memory arm, name it)] over the
    split's states about an existing memory that is shown (the first `most` of them; 0: all)."""
    convs = split_conversations(split, limit)
    rows = []
    for conv in convs:
        for ex in manager_examples(conv, [], conversation_facts(conv, "observation"), tok, embedder, k=manager_k,
                                   vocab_size=model.lm_head.weight.shape[0], fmt="ops"):
            target = next((e["id"] for e in conv.oracle[ex.meta["dia_id"]]["events"] if e["event"] != "ADD"), None)
            shown = {real: i for i, real in ex.meta["id_map"].items()}
            s = slot(ex.prompt, ex.guide, prompts.decision_marker(tok))
            if target in shown and s is not None:
                rows.append((oracle_kind(ex), shown[target], ex, ForcedArm(ex.guide, s[1], s[3])))
    picks, rows = defaultdict(list), rows[:most or None]
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        outs = generate(model, [ex.prompt for _, _, ex, _ in chunk], 64, temperature=0, guide=[g for *_, g in chunk])
        for (kind, target, ex, _), out in zip(chunk, outs):
            bank = ex.meta["banks"][ex.meta["speaker"]]
            shown = [{"id": i, "text": bank.memories[real].text} for i, real in ex.meta["id_map"].items()]
            events = prompts.parse_manager_ops(tok.decode(out), [f.text for f in ex.meta["facts"]], shown).value
            picks[kind].append((target == "0", bool(events) and events[0]["id"] == target))
    return picks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=OFFLINE_SMOLLM2, help="the manager's policy (a checkpoint or the base)")
    ap.add_argument("--split", choices=("train", "val", "heldout"), default="val",
                    help="heldout: the test worlds in phrasing families training never sees (a diagnostic)")
    ap.add_argument("--family", type=int, help="the split's worlds worded by this phrasing family (gym.FAMILIES; val "
                    "in family 1 is how far a head carries to other words, read on val); default: the split's own")
    ap.add_argument("--limit", type=int, default=0, help="conversations (0: all of the split)")
    ap.add_argument("--manager-k", type=int, default=2, help="memories shown per fact (the cpu preset's 2)")
    ap.add_argument("--embedder", default="minilm", help="the manager's retrieval (the cpu preset's minilm)")
    ap.add_argument("--probe", action="store_true", help="also fit a linear probe on train's decision-slot states "
                    "(ADD against change; train's worlds in phrasing family 0, then 0 and 1); its AUC on --split")
    ap.add_argument("--no-demos", action="store_true", help="the ops prompt without its worked examples "
                    "(prompts.MANAGER_OPS_DEMOS), as before they were added")
    ap.add_argument("--which-memory", action="store_true", help="also: on the states about a shown memory, is it the "
                    "most similar one, and does the LM, made to name a memory, name it (memory_picks)")
    ap.add_argument("--smoke", action="store_true", help="one conversation")
    args = ap.parse_args()
    if args.family is not None and (args.split == "heldout" or args.family not in gym.WORDS):
        ap.error(f"--family {args.family}: give one of the phrasing families {sorted(gym.WORDS)}, and not with --split "
                 "heldout (the test worlds in the families it words them in itself)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # both cores, unless told fewer
    if args.no_demos:
        prompts.MANAGER_OPS_DEMOS = ()  # manager_messages reads it at each call
    model, tok = load_model(args.model)
    load_head(model, args.model)  # decision.py: P(new) = sigmoid(L + s(h)) for a manager trained with one
    embedder = make_embedder(args.embedder)
    limit = 1 if args.smoke else args.limit
    families = None if args.family is None else [args.family]
    states = decision_states(model, tok, split_conversations(args.split, limit, families), args.manager_k, embedder)
    by_kind = {kind: [x for x, _ in rows] for kind, rows in states.items()}
    worded = "" if args.family is None else f" in phrasing family {args.family}"
    print(f"{args.model}, gym {args.split}{worded}: {sum(map(len, by_kind.values()))} states")
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
    if args.which_memory or args.smoke:  # the smoke test runs every part
        print("| oracle kind | states | the memory to change is shown first | the LM, made to name a memory, names it |")
        print("|---|---|---|---|")
        picks = memory_picks(model, tok, args.split, limit, args.manager_k, embedder, 4 if args.smoke else 0)
        for kind, rows in sorted(picks.items()):
            first, named = [float(f) for f, _ in rows], [float(n) for _, n in rows]
            print(f"| {kind} | {len(rows)} | {sum(first) / len(rows):.2f} +- {standard_error(first):.2f} | "
                  f"{sum(named) / len(rows):.2f} +- {standard_error(named):.2f} |")
    if args.probe:
        for families in ([0], [0, 1]):  # fit on the train worlds in family 0 (the training split), or in 0 and 1
            train = decision_states(model, tok, split_conversations("train", limit, families), args.manager_k, embedder)
            fit, held = linear_probe(train, states)
            print(f"linear probe on the decision slot's hidden state (ADD against change; fit on train, phrasing "
                  f"families {families}): AUC {fit:.3f} on train, {held:.3f} on {args.split}")


if __name__ == "__main__":
    main()
