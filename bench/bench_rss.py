"""Where the main command's memory goes: resident memory after each piece train.run builds, in one precision.

    python bench/bench_rss.py --precision float32      # then --precision bf16, and compare
    python bench/bench_rss.py --smoke --model CKPT      # the smallest setting (the test suite runs it)

Loads what `python train.py --algo grpo` holds, in its order (the policy, the frozen reference, the task's
banks and prompts, AdamW's state after one step), then runs the greedy validation batch (64 prompts) and
one GRPO step, printing the resident set (VmRSS) and its peak so far (VmHWM) from /proc/self/status after
each. The deltas are what each piece costs; the last peak is the run's (the main command's /usr/bin/time
peak agrees with it to a few percent).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402
import precision  # noqa: E402
import checkpoint  # noqa: E402
import train  # noqa: E402
from agents import answer_task  # noqa: E402
from flags import parse_args  # noqa: E402
from parallel import prepare_models  # noqa: E402


def rss() -> tuple[float, float]:
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
    return tuple(int(status[k].split()[0]) / 2**20 for k in ("VmRSS", "VmHWM"))  # GiB


def main():
    argv = sys.argv[1:]
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    if smoke:
        argv += ["--val-limit", "2", "--questions-per-step", "1", "--group-size", "2", "--max-new-tokens", "2"]
    args = parse_args(["--algo", "grpo", "--out", "/tmp/bench_rss", *argv])
    torch.set_num_threads(2)
    rows, last = [], [0.0]

    def mark(what):
        now, peak = rss()
        rows.append(f"| {what} | {now:.2f} GiB | {now - last[0]:+.2f} GiB | {peak:.2f} GiB |")
        last[0] = now

    mark("python, torch and the project imported")
    args.precision = precision.configure(args.precision, "cpu")
    base, tok = M.load_model(args.model)
    mark(f"the policy, with its engine copies ({args.precision})")
    task = answer_task(args, tok, base)
    mark("the task: banks, retrieval, prompts")
    policy, ref, _ = checkpoint.load_models(args, base, None)
    mark("the frozen reference, with its engine copies")
    t0 = time.perf_counter()
    train.validate(policy, tok, task, args)
    mark(f"greedy validation, {min(args.val_limit or len(task.val), len(task.val))} prompts in batches of "
         f"{args.val_batch} ({time.perf_counter() - t0:.0f} s)")
    opt = checkpoint.make_optimizer(policy, args.lr, args.optimizer, args.weight_decay)
    groups, _ = train.rollout(policy, tok, task, train.step_examples(task, 0, args), 0, args, ref)
    mark("one rollout (samples, the reference's log-probs)")
    policy_pass, _ = prepare_models(policy, ref, None, torch.device("cpu"), False)
    train.update(policy_pass, opt, groups, 0, args)
    mark("one update (loss pass, backward, AdamW's state created)")
    print(f"precision {args.precision}, {args.model}")
    print("| after | resident | change | peak so far |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
