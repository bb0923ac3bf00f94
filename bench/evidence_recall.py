"""Evidence recall@k of memory banks built with every fact ADDed (no manager): does the memory keep the facts?

    python bench/evidence_recall.py --facts observation --split test      # the dataset's own facts
    python bench/evidence_recall.py --facts turn --split test             # each turn's text
    python bench/evidence_recall.py --split val --k 10 --embedder minilm  # all-MiniLM-L6-v2 (minilm.py)
    python bench/evidence_recall.py --smoke                               # the val split (the test suite)

One bank per speaker; for each question the top k/2 memories of each bank are retrieved (30 + 30 for
k = 60, as the Answer Agent does) and recall = the fraction of the question's evidence turns that some
retrieved memory came from. Prints overall and per-category means.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agents import conversation_facts  # noqa: E402
from data.locomo import CATEGORY_LABELS, load_conversations, load_split, split_of  # noqa: E402
from memory import add_all_banks, make_embedder  # noqa: E402
from metrics import evidence_recall, standard_error  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", choices=["observation", "turn"], default="observation", help="fact source")
    ap.add_argument("--split", choices=["train", "val", "test"], default="test")
    ap.add_argument("--k", type=int, default=60, help="memories retrieved per question (half per speaker)")
    ap.add_argument("--embedder", choices=("hash", "minilm"), default="hash", help="memory.make_embedder's kind")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: the val split's one conversation")
    args = ap.parse_args()
    if args.smoke:
        args.split = "val"
    t0 = time.perf_counter()
    convs = {c.sample_id: c for c in load_conversations() if split_of(c.sample_id) == args.split}
    embedder = make_embedder(args.embedder)
    banks = {cid: add_all_banks(c, conversation_facts(c, args.facts), embedder) for cid, c in convs.items()}
    per_cat = defaultdict(list)
    for q in load_split(args.split):
        retrieved = [m for bank in banks[q.conv_id].values() for m in bank.search(q.question, args.k // 2)]
        r = evidence_recall(q.evidence, retrieved)
        if r is not None:
            per_cat[q.category].append(r)
    every = [r for rs in per_cat.values() for r in rs]
    n_mem = sum(len(b) for bs in banks.values() for b in bs.values())
    print(f"{args.split}: {len(convs)} conversations, {n_mem:,} memories ({args.facts}, {embedder.name}), "
          f"{len(every)} questions with evidence, {time.perf_counter() - t0:.1f} s")
    for cat in sorted(per_cat):
        print(f"  category {cat} ({CATEGORY_LABELS[cat]}): recall@{args.k} = {statistics.mean(per_cat[cat]):.3f}"
              f"  (n={len(per_cat[cat])})")
    print(f"  overall: recall@{args.k} = {statistics.mean(every):.3f} +- {standard_error(every):.3f}")


if __name__ == "__main__":
    main()
