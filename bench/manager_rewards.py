"""Does the manager's outcome reward rank the right operation first? The reward of the oracle's decision and of
each wrong one, per kind of gym turn, before any training (docs/method.md section 9's table, for the "ops" format).

    python bench/manager_rewards.py --flags "--answerer runs/grpo-answer/checkpoint"           # the cpu preset
    python bench/manager_rewards.py --flags "--answerer runs/grpo-answer/checkpoint --reward em --memories-per-speaker 5"
    python bench/manager_rewards.py --flags "--answerer runs/grpo-answer/checkpoint" --split train

Builds the manager's RL states exactly as train.py does (train.parse_args with --flags; agents.manager_task),
writes for each state the outputs of a few fixed decisions in the "ops" format, and scores them with the
task's own reward (agents.manager_score_many: the frozen answerer on the edited bank):

    oracle     the gym's correct events (ADD; UPDATE of a changed value; MERGE of a set with the oracle's
               merged text; DELETE; NONE)
    none       the bank left as it is                 add        the fact ADDed, nothing else
    upd_fact   the memory to change UPDATEd to the fact's own text (for a merge: the fact instead of the merge)
    wrong_upd  another shown memory UPDATEd to the fact   wrong_del  another shown memory DELETEd

Prints, per oracle kind, the mean reward of each (with its standard error over the turns) and the paired
margin of the oracle over the best wrong decision. Settings are chosen on train and val, never on test.
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from metrics import standard_error  # noqa: E402

CANDIDATES = ("oracle", "none", "add", "upd_fact", "wrong_upd", "wrong_del")
KINDS = agents.ORACLE_KINDS
SAME_AS_ORACLE = {"ADD": "add", "UPDATE change": "upd_fact", "NONE": "none"}  # the same bank as the oracle's


def entry(about: str, event: str, text: str | None = None) -> str:
    merge = f', "text": "{text}"' if text is not None else ""
    return f'{{"memory": [{{"fact": 0, "about": "{about}", "event": "{event}"{merge}}}]}}'


def candidates(example) -> tuple[str, dict[str, str]]:
    """(the oracle's kind, candidate name -> output text) for one gym state (one fact per turn)."""
    meta = example.meta
    events = meta["conv"].oracle[meta["dia_id"]]["events"]
    shown_of = {real: shown for shown, real in meta["id_map"].items()}
    target = next((e for e in events if e["event"] != "ADD"), None)
    kind = agents.oracle_kind(example)
    out = {"add": entry("new", "ADD")}
    if shown_of:
        out["none"] = entry(next(iter(shown_of.values())), "NONE")
    about = shown_of.get(target["id"]) if target else None
    if target is None:
        out["oracle"] = out["add"]
    elif about is not None:  # the memory to change was shown (else the oracle cannot be written)
        text = target.get("text", "").replace('"', "'")
        out["oracle"] = entry(about, {"UPDATE": "MERGE" if kind == "UPDATE merge" else "UPDATE"}.get(
            target["event"], target["event"]), text if kind == "UPDATE merge" else None)
        out["upd_fact"] = entry(about, "UPDATE")
    others = [s for real, s in shown_of.items() if target is None or real != target["id"]]
    if others:
        out["wrong_upd"], out["wrong_del"] = entry(others[0], "UPDATE"), entry(others[0], "DELETE")
    return kind, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flags", default="", help="train.py flags that define the manager's task (quoted)")
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2)
    ap.add_argument("--split", choices=("val", "train"), default="val")
    ap.add_argument("--limit", type=int, default=0, help="states scored (0: all of the split)")
    ap.add_argument("--smoke", action="store_true", help="4 states with a tiny model")
    a = ap.parse_args()
    # the smoke test: never the main command's answerer in runs/, and hashed retrieval (MiniLM would embed every
    # state of both splits to score 4 of them)
    smoke = ["--answerer", str(a.model), "--embedder", "hash"] if a.smoke else []
    args = train.parse_args(["--model", str(a.model), "--out", "unused", "--agent", "manager", "--preset", "cpu",
                             *smoke, *shlex.split(a.flags)])  # the cpu preset: the ops format
    base, tok = M.load_model(args.model)
    task = agents.manager_task(args, tok, base)
    states = task.val if a.split == "val" else task.train
    states = states[:4] if a.smoke else states[:a.limit] if a.limit else states
    t0 = time.perf_counter()
    written = [candidates(ex) for ex in states]
    pairs = [(ex, list(c.values())) for ex, (_, c) in zip(states, written)]
    scored = task.score_all(pairs)
    table = {kind: {name: [] for name in CANDIDATES} for kind in KINDS}
    margins, wins, unwritable = {kind: [] for kind in KINDS}, {kind: [] for kind in KINDS}, 0
    for (kind, cands), rows in zip(written, scored):
        reward = {name: row["reward"] for name, row in zip(cands, rows)}
        for name, r in reward.items():
            table[kind][name].append(r)
        if "oracle" not in reward:
            unwritable += 1
            continue
        rivals = [r for name, r in reward.items() if name not in ("oracle", SAME_AS_ORACLE.get(kind))]
        if rivals:
            margins[kind].append(reward["oracle"] - max(rivals))
            wins[kind].append(float(reward["oracle"] > max(rivals)))
    print(f"reward {args.reward} (temperature {args.reward_temperature}), answerer k {args.memories_per_speaker}, "
          f"manager k {args.manager_k}, {a.split} split, {len(states)} states ({unwritable} with the memory to "
          f"change not shown), {time.perf_counter() - t0:.0f} s")
    print("| oracle kind (turns) | " + " | ".join(CANDIDATES) + " | oracle - best wrong (paired) | oracle strictly best |")
    print("|---" * (len(CANDIDATES) + 3) + "|")
    for kind in KINDS:
        n = len(table[kind]["add"])
        if not n:
            continue
        cells = [f"{sum(v) / len(v):.3f} ± {standard_error(v):.3f}" if v else "–" for v in table[kind].values()]
        m = margins[kind]
        margin = f"{sum(m) / len(m):+.3f} ± {standard_error(m):.3f}" if m else "–"
        best = f"{sum(wins[kind]) / len(wins[kind]):.2f}" if wins[kind] else "–"
        print(f"| {kind} ({n}) | " + " | ".join(cells) + f" | {margin} | {best} |")


if __name__ == "__main__":
    main()
