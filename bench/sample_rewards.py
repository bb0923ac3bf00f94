"""What a GRPO step would see before any training: the base model's sampled rewards on training questions.

    python bench/sample_rewards.py                                    # the cpu preset's Answer Agent task
    python bench/sample_rewards.py --flags "--temperature 1.0"        # the same at the paper's temperature
    python bench/sample_rewards.py --flags "--distill --max-new-tokens 48"
    python bench/sample_rewards.py --flags "--agent manager --answerer runs/grpo-answer/checkpoint"

Builds the agent's task exactly as train.py does (train.parse_args with --flags, agents.answer_task or
agents.manager_task), samples G completions of `--questions` training prompts (a seeded choice) with the
task's guide, and prints the mean reward, the share of groups whose rewards are not all equal (GRPO learns
only from those), the mean completion length and the means of every score. This is how the cpu preset's
temperature, prompt and length were chosen (docs/results.md, "How the `cpu` preset was chosen"); it reads training prompts only.
"""

import argparse
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from metrics import mean_scores  # noqa: E402
from sampling import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flags", default="", help="train.py flags that define the task (quoted)")
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2)
    ap.add_argument("--questions", type=int, default=12, help="training questions sampled")
    ap.add_argument("--group-size", type=int, default=8, help="completions per question (G)")
    ap.add_argument("--smoke", action="store_true", help="2 questions x 2 samples x 2 tokens (a tiny model)")
    a = ap.parse_args()
    flags = shlex.split(a.flags) + (["--max-new-tokens", "2"] if a.smoke else [])
    args = train.parse_args(["--model", str(a.model), "--out", "unused", *flags])
    n, G = (2, 2) if a.smoke else (a.questions, a.group_size)
    base, tok = M.load_model(args.model)
    task = (agents.answer_task if args.agent == "answer" else agents.manager_task)(args, tok, base)
    chosen = random.Random(0).sample(task.train, n)
    t0 = time.perf_counter()
    out = generate(base, [ex.prompt for ex in chosen for _ in range(G)], args.max_new_tokens, args.temperature,
                   args.top_p, seed=0, guide=[ex.guide for ex in chosen for _ in range(G)])
    seconds = time.perf_counter() - t0
    rewards, with_signal, scores = [], 0, []
    for i, ex in enumerate(chosen):
        scores += task.score(ex, [tok.decode(c) for c in out[i * G:(i + 1) * G]])
        group = [s["reward"] for s in scores[-G:]]
        rewards += group
        with_signal += statistics.pstdev(group) > 0
        print(f"{ex.gold or ex.meta.get('dia_id')!r:>32}: {' '.join(f'{r:.2f}' for r in group)}   "
              f"e.g. {tok.decode(out[i * G])[:60]!r}")
    print(f"{args.agent} agent, {args.data}, distill {args.distill}, temperature {args.temperature}, "
          f"{args.max_new_tokens} tokens: "
          f"mean reward ({args.reward}) {sum(rewards) / len(rewards):.3f}, groups with signal {with_signal}/{n}, "
          f"mean length {sum(map(len, out)) / len(out):.1f} tokens, sampling {seconds:.1f} s")
    print("means of every score: " + ", ".join(f"{k} {v:.3f}" for k, v in mean_scores(scores).items()))


if __name__ == "__main__":
    main()
