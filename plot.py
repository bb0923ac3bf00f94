"""A run's learning curves, drawn from its metrics.jsonl: OUT/curves.png.

    python plot.py runs/grpo-answer/metrics.jsonl                  # writes runs/grpo-answer/curves.png
    python plot.py runs/grpo-manager/metrics.jsonl --out manager.png

train.py draws the picture at the end of every run. matplotlib is optional (requirements.txt): without it
the run still finishes and says how to get the picture; this command redraws it from any metrics.jsonl,
also from a run still going or one that was killed.

Panels: the reward of the sampled completions per step (band: standard error over the step's prompts,
`reward_se`); the held-out metrics at every validation (band: their standard errors over the validation
prompts, `val_*_se`); for the Memory Manager, the mix of decisions it sampled per step (`sampled_dec_*`
with dynamic sampling, else `dec_*`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HINT = "pip install matplotlib, then: python plot.py {path}"
SMOOTH = 4  # steps in the training reward's running mean


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of a metrics file; a line cut short by a killed run is skipped, not an error."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise SystemExit(f"{path}: no metrics lines to plot")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, values, standard errors) of the rows that have `key` (0 where no `key`_se was logged)."""
    have = [r for r in rows if key in r]
    return ([r["step"] for r in have], [r[key] for r in have], [r.get(f"{key}_se", 0.0) for r in have])


def decision_keys(rows: list[dict]) -> list[str]:
    """The decision-mix keys a manager run logs, sampled_dec_* (before dynamic sampling drops groups) first."""
    keys = dict.fromkeys(k for r in rows for k in r)
    for prefix in ("sampled_dec_", "dec_"):
        found = [k for k in keys if k.startswith(prefix)]
        if found:
            return found
    return []


def draw(rows: list[dict], title: str, dest: Path) -> Path:
    """Write the curves of `rows` to `dest` (PNG); raises ImportError without matplotlib."""
    import matplotlib  # optional: only this function needs it
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    decisions = decision_keys(rows)
    n = 3 if decisions else 2
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), constrained_layout=True)

    def band(ax, key, label):
        steps, vals, ses = series(rows, key)
        if not steps:
            return
        line, = ax.plot(steps, vals, marker="o" if len(steps) < 8 else None, label=label)
        ax.fill_between(steps, [v - s for v, s in zip(vals, ses)], [v + s for v, s in zip(vals, ses)],
                        color=line.get_color(), alpha=0.2, linewidth=0)

    train_ax, val_ax = axes[0], axes[1]
    band(train_ax, "reward", "per step (± s.e.)")
    steps, vals, _ = series(rows, "reward")
    if len(steps) >= 2 * SMOOTH:  # the trend under the noise of a few prompts per step
        windows = [vals[max(0, i - SMOOTH + 1):i + 1] for i in range(len(vals))]
        means = [sum(w) / len(w) for w in windows]
        train_ax.plot(steps, means, color="black", linewidth=1.5, label=f"mean of the last {SMOOTH} steps")
    train_ax.set(title="training: the rollouts' reward", xlabel="step", ylabel="mean reward")
    train_ax.legend(loc="best", fontsize=8)
    f1 = any("val_f1" in r for r in rows)  # the answerer's: F1 beside EM (its reward may turn from one to the other)
    for key in ("val_f1" if f1 else "val_reward", "val_em", "val_op_acc"):
        band(val_ax, key, key.removeprefix("val_"))
    val_ax.set(title="held out: greedy (± s.e.)", xlabel="step")
    val_ax.legend(loc="best", fontsize=8)
    if decisions:
        ax = axes[2]
        steps = [r["step"] for r in rows if decisions[0] in r]
        ax.stackplot(steps, *[[r[k] for r in rows if decisions[0] in r] for k in decisions],
                     labels=[k.split("dec_")[1].upper() for k in decisions])
        ax.set(title="the manager's sampled decisions", xlabel="step", ylabel="share", ylim=(0, 1))
        ax.legend(loc="lower left", fontsize=7)
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    fig.suptitle(title, fontsize=10)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def save_curves(metrics: Path, dest: Path | None = None) -> str:
    """Draw `metrics`'s curves next to it (or at `dest`); returns the line to print: where the picture is,
    or how to get it when matplotlib is missing."""
    metrics = Path(metrics)
    dest = dest or metrics.with_name("curves.png")
    try:
        draw(read_metrics(metrics), metrics.parent.name, dest)
    except ImportError:
        return f"curves: matplotlib is not installed; {HINT.format(path=metrics)}"
    return f"curves: {dest}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", type=Path, help="a run's metrics.jsonl (train.py writes OUT/metrics.jsonl)")
    ap.add_argument("--out", type=Path, help="the PNG to write (default: curves.png next to the metrics)")
    args = ap.parse_args(argv)
    if not args.metrics.is_file():
        raise SystemExit(f"{args.metrics}: no such metrics file (train.py writes OUT/metrics.jsonl)")
    print(save_curves(args.metrics, args.out))


if __name__ == "__main__":
    main()
