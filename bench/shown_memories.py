"""Does the Memory Manager see the memory it should change? The shown-memory hit rate per embedder and k.

    python bench/shown_memories.py --split val         # hashed n-grams and all-MiniLM-L6-v2, k = 1, 2, 5
    python bench/shown_memories.py --smoke             # one conversation, k = 2 (the test suite runs it)

The manager is shown, for each fact of a turn, the k memories of the speaker's bank most similar to it
(manager.related_memories, Mem0's design); it can only UPDATE, DELETE or leave alone a memory it is shown.
For each gym fact turn whose right decision is about an existing memory (UPDATE of a changed value, UPDATE
merging a set, DELETE of a retracted one, NONE on a restatement), the state is built as train.py builds it
(agents.manager_examples: the oracle banks before the turn); a hit is a turn whose memory to change is among
those shown. A miss caps the manager: its right decision cannot be written.
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data.gym as gym  # noqa: E402
from agents import conversation_facts, manager_examples, oracle_kind  # noqa: E402
from memory import make_embedder  # noqa: E402
from metrics import standard_error  # noqa: E402
from model import OFFLINE_SMOLLM2, load_model  # noqa: E402

COLUMNS = ("UPDATE change", "UPDATE merge", "DELETE", "NONE", "all")  # the kinds about an existing memory


def hits_by_kind(convs, tok, embedder, k: int) -> dict[str, list[int]]:
    """Oracle kind -> one 0/1 per gym state of that kind: is the memory the oracle changes among those shown?"""
    out = defaultdict(list)
    for conv in convs:
        for ex in manager_examples(conv, [], conversation_facts(conv, "observation"), tok, embedder, k=k,
                                   fmt="ops"):
            events = ex.meta["conv"].oracle[ex.meta["dia_id"]]["events"]
            target = next((e for e in events if e["event"] != "ADD"), None)
            if target is not None:
                out[oracle_kind(ex)].append(int(target["id"] in ex.meta["id_map"].values()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=("train", "val"), default="val", help="never test: settings are chosen here")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 5], help="memories shown per fact")
    ap.add_argument("--embedders", nargs="+", default=["hash", "minilm"], choices=("hash", "minilm"))
    ap.add_argument("--smoke", action="store_true", help="one val conversation, k = 2")
    args = ap.parse_args()
    convs = [c for c in gym.load_conversations() if gym.split_of(c.sample_id) == args.split]
    if args.smoke:
        convs, args.k = convs[:1], [2]
    tok = load_model(OFFLINE_SMOLLM2)[1]  # manager_examples writes the prompts; the model itself is not used
    print(f"gym {args.split}: {len(convs)} conversations; hit rate = share of turns whose memory to change is shown"
          " (mean +- standard error)")
    print("| embedder | k | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name in args.embedders:
        embedder = make_embedder(name)
        for k in args.k:
            t0 = time.perf_counter()
            hits = hits_by_kind(convs, tok, embedder, k)
            cells = []
            for kind in COLUMNS:
                xs = [h for hs in hits.values() for h in hs] if kind == "all" else hits.get(kind, [])
                cells.append(f"{sum(xs) / len(xs):.2f} +- {standard_error(xs):.2f} (n={len(xs)})" if xs else "-")
            print(f"| {embedder.name} | {k} | " + " | ".join(cells) + f" |  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
