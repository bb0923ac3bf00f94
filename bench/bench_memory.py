"""Memory bank speed: add N memories one by one, then time top-k cosine search.

    python bench/bench_memory.py              # 100,000 memories, top-60, default hashed n-gram embedder
    python bench/bench_memory.py --embedder minilm --n 10000    # all-MiniLM-L6-v2 (minilm.py)
    python bench/bench_memory.py --smoke      # 1,000 memories, 10 searches (the test suite runs it)

Prints the time to add (embedding included, and the bank's own share with precomputed vectors) and the
median / p95 search latency over 200 queries (query embedding included).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory import EMBEDDERS, MemoryBank, make_embedder  # noqa: E402

WORDS = ("dog cat paint race beach camp book music school friend pottery adopt sister trip concert garden "
         "hike job move city lake mountain guitar violin class support group parade family dinner").split()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="memories to add")
    ap.add_argument("--k", type=int, default=60, help="memories per search")
    ap.add_argument("--queries", type=int, default=200, help="searches to time")
    ap.add_argument("--embedder", choices=EMBEDDERS[:2], default="hash", help="memory.make_embedder's kind")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: 1,000 memories, 10 searches")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.queries = 1000, 10
    rng = np.random.default_rng(0)
    texts = [f"{rng.choice(WORDS)} " + " ".join(rng.choice(WORDS, 7)) + f" #{i}" for i in range(args.n)]
    embedder = make_embedder(args.embedder)

    t0 = time.perf_counter()
    vectors = embedder(texts)
    t_embed = time.perf_counter() - t0
    bank = MemoryBank(embedder)
    t0 = time.perf_counter()
    for text, v in zip(texts, vectors):  # one by one: exercises the amortised growth
        bank.add(text, vector=v)
    t_add = time.perf_counter() - t0

    queries = [" ".join(rng.choice(WORDS, 6)) for _ in range(args.queries)]
    bank.search(queries[0], args.k)
    times = []
    for q in queries:
        t0 = time.perf_counter()
        hits = bank.search(q, args.k)
        times.append(time.perf_counter() - t0)
    assert len(hits) == args.k
    times.sort()
    print(f"memories: {len(bank):,}  embedder: {embedder.name}  dim: {embedder.dim}")
    print(f"embed {args.n:,} texts: {t_embed:.1f} s ({1e6 * t_embed / args.n:.0f} us each)")
    print(f"add {args.n:,} one by one (vectors given): {t_add:.2f} s ({1e6 * t_add / args.n:.1f} us each)")
    print(f"top-{args.k} search: median {1e3 * statistics.median(times):.2f} ms, "
          f"p95 {1e3 * times[int(0.95 * len(times))]:.2f} ms")


if __name__ == "__main__":
    main()
