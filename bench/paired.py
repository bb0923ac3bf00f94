"""Did one answerer beat another beyond the noise? The paired difference of their scores on the same questions.

    python bench/paired.py runs/eval-a runs/eval-b           # two evaluate.py output folders (predictions.jsonl)
    python bench/paired.py --val runs/old/checkpoint runs/grpo-answer/checkpoint   # train.py's validation questions

Two figures each with its own standard error say little when they are scored on the same questions: a question
one answerer gets right the other often does too. The paired difference (B - A per question, its mean and that
mean's standard error) removes what the questions share; docs/results.md states it beside each claim.
With --val each checkpoint answers the validation questions the main command scores (train.py's flags, given
with --flags; greedy, as train.validate), and the two answer lists are compared the same way.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from metrics import standard_error  # noqa: E402
from sampling import generate  # noqa: E402


def paired(a: list[dict], b: list[dict], keys=("em", "f1")) -> str:
    """Lines: per key, A's and B's means with standard errors, and B - A's mean with its paired standard error."""
    lines = [f"{len(a)} questions scored by both (mean +- standard error; x 100)"]
    for k in keys:
        x, y = [r[k] for r in a], [r[k] for r in b]
        d = [v - u for u, v in zip(x, y)]
        lines.append(f"  {k:3s} A {100 * sum(x) / len(x):6.2f} +- {100 * standard_error(x):.2f}   "
                     f"B {100 * sum(y) / len(y):6.2f} +- {100 * standard_error(y):.2f}   "
                     f"B - A {100 * sum(d) / len(d):+6.2f} +- {100 * standard_error(d):.2f}   "
                     f"(B better on {sum(v > 0 for v in d)}, worse on {sum(v < 0 for v in d)})")
    cats = sorted({r["category"] for r in a if "category" in r})
    if cats:  # what moved: right answers per question category (the gym's: 1 unchanged ... 5 retracted)
        lines.append("  em by category, right of n (A -> B): " + ", ".join(
            f"{c}: {sum(r['em'] for r in a if r.get('category') == c):.0f} -> "
            f"{sum(r['em'] for r in b if r.get('category') == c):.0f} of {sum(r.get('category') == c for r in a)}"
            for c in cats))
    return "\n".join(lines)


def read_predictions(folder: Path) -> dict:
    """evaluate.py's predictions.jsonl: (conversation, question index) -> its scores. A conversation is named by its
    id's last part, so the gym's test and heldout splits (the same worlds, other words) pair question by question."""
    path = Path(folder) / "predictions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no predictions (evaluate.py --out {folder} writes them)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["conv_id"].rsplit("-", 1)[-1], r["index"]): r for r in rows}


def val_scores(checkpoint: str, args, task) -> list[dict]:
    """Greedy answers of `checkpoint` to the first val_limit validation prompts, scored by EM and F1."""
    policy, tok = M.load_model(checkpoint)
    examples = task.val[:args.val_limit] if args.val_limit else task.val
    out = []
    for i in range(0, len(examples), args.val_batch):
        chunk = examples[i:i + args.val_batch]
        answers = generate(policy, [ex.prompt for ex in chunk], args.max_new_tokens, temperature=0,
                           guide=[ex.guide for ex in chunk])
        out += [{**agents.score_answer(tok.decode(t), ex.gold, "em", args.require_marker),
                 "category": ex.meta.get("category")} for ex, t in zip(chunk, answers)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", nargs="?", help="an evaluate.py folder, or with --val a checkpoint (the baseline)")
    ap.add_argument("b", nargs="?", help="the same for the candidate")
    ap.add_argument("--val", action="store_true", help="compare two checkpoints on train.py's validation questions")
    ap.add_argument("--flags", default="--algo grpo", help="with --val: the train.py flags that define the task")
    ap.add_argument("--smoke", action="store_true", help="--model against itself on 2 val questions, 2 tokens")
    ap.add_argument("--model", help="with --smoke: the checkpoint")
    a = ap.parse_args()
    if a.smoke:
        a.a = a.b = a.model
        a.val, a.flags = True, f"{a.flags} --model {a.model} --val-limit 2 --max-new-tokens 2"
    if not (a.a and a.b):
        ap.error("give two evaluate.py folders, or --val and two checkpoints")
    if not a.val:
        pa, pb = read_predictions(Path(a.a)), read_predictions(Path(a.b))
        common = [k for k in pa if k in pb]
        if not common:
            raise SystemExit(f"{a.a} and {a.b} share no question (another split or --limit?)")
        print(paired([pa[k] for k in common], [pb[k] for k in common]))
        return
    args = train.parse_args(shlex.split(a.flags))
    if args.agent != "answer":
        raise SystemExit("--val compares Answer Agent checkpoints (--flags with --agent answer)")
    base, tok = M.load_model(args.model)
    task = agents.answer_task(args, tok, base)  # the prompts the run validated on (banks built by the base model)
    print(paired(val_scores(a.a, args, task), val_scores(a.b, args, task)))


if __name__ == "__main__":
    main()
