"""Choose the decision head's update rule on val in seconds: replay a run's scored training states offline.

    python bench/head_replay.py --run runs/mgr-replay      # a finished `train.py ... --decision-head --head-replay`
    python bench/head_replay.py --run runs/mgr-replay --val-limit 256 --also runs/grpo-manager   # + another head
    python bench/head_replay.py --smoke --run RUN           # 2 val states (the test suite runs it)

Why this is exact, not a model of training: under --decision-head the network is frozen and --all-arms forces
every output's first decision in turn, so what a step samples and how it scores does not depend on the head's w
(the same seeds give the same rewards whatever w is). The run's decision_replay.safetensors (decision.remember)
therefore holds what *any* update rule would have been shown, step by step (questions_per_step states a step).
Greedy validation depends on w only through the arm the head takes at each val state, so each val state is
decoded once per arm ("new", a memory) and scored by the run's frozen answerer; any w then scores on val
without the LM. This script replays the recipe's steps under other rules (learning rate, passes over the
remembered states, replay or this step's states alone), prints val after each rule's last step, and checks
itself: the replayed recipe must end at the run's own head.

Settings are read on train and val, never on test.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decision  # noqa: E402
import model as M  # noqa: E402
from agents import manager_task  # noqa: E402
from grammar import ForcedArm  # noqa: E402
from metrics import mean_scores, standard_error  # noqa: E402
from prompts import decision_marker  # noqa: E402
from sampling import generate  # noqa: E402

KINDS = ("op_acc", "op_acc_add", "op_acc_update", "op_acc_none", "op_acc_delete", "reward")


def run_args(run: Path) -> argparse.Namespace:
    """The run's own flags, as train.py saved them (trainer_state.json)."""
    args = argparse.Namespace(**json.loads((run / "checkpoint" / "trainer_state.json").read_text())["args"])
    if not (args.decision_head and getattr(args, "head_replay", False)):
        raise SystemExit(f"{run}: not a --decision-head --head-replay run (nothing remembered to replay)")
    return args


@torch.no_grad()
def val_table(net, tok, task, args, limit: int) -> tuple[list, list]:
    """Per val state: (L, h) at its slot or None, and its greedy scores under each arm [new, memory]."""
    examples = task.val[:limit]
    states = decision.states_at_slots(net, examples, args.decision_marker)
    rows = []
    for i in range(0, len(examples), args.val_batch):
        chunk = examples[i:i + args.val_batch]
        per_arm = []
        for arm in (0, 1):  # ForcedArm at the slot: greedy decoding then follows the frozen LM within the arm
            guides = []
            for ex in chunk:
                s = decision.slot(ex.prompt, ex.guide, args.decision_marker)
                guides.append(ex.guide if s is None else ForcedArm(ex.guide, s[1], s[2] if arm == 0 else s[3]))
            outs = generate(net, [ex.prompt for ex in chunk], args.max_new_tokens, temperature=0, guide=guides)
            per_arm.append([r[0] for r in task.score_all([(ex, [tok.decode(o)]) for ex, o in zip(chunk, outs)])])
        rows += list(zip(*per_arm))
    return states, rows


def val_scores(head, states, rows) -> dict:
    """The means over val of the scores greedy decoding gets under `head` (the arm with L + s(h) > 0 is "new")."""
    picked = []
    for st, (new, mem) in zip(states, rows):
        take_new = st is None or (st[0] + head(st[1][None])[0]).item() > 0
        picked.append(new if take_new else mem)
    out = mean_scores(picked)
    out.update({f"{k}_se": standard_error([p[k] for p in picked if k in p]) for k in KINDS})
    out.update({f"{k}_n": sum(k in p for p in picked) for k in KINDS})
    return out


def replay(start_state: dict, rep: dict, per_step: int, steps: int, lr: float, passes: int, remember_all: bool,
           scale: bool = True):
    """The head after `steps` steps of the rule: each step's states (rep["step"], or `per_step` a step for a replay
    saved without it) join (or replace) the remembered ones, then `passes` SGD steps of decision.replay_step
    (clip 1, as train.py; scale=False: advantages not divided by the arms' reward spread, --no-adv-scale)."""
    head = decision.DecisionHead(start_state["w"].numel())
    head.load_state_dict(start_state)
    with torch.no_grad():
        head.w.zero_()
    opt = torch.optim.SGD([head.w], lr=lr)
    joined = rep["step"] if "step" in rep else torch.arange(len(rep["L"])) // per_step  # [n]
    for t in range(steps):
        keep = (joined <= t) if remember_all else (joined == t)
        head.replay = {k: v[keep] for k, v in rep.items()}
        decision.replay_step(head, opt, 1.0, passes, scale)
    return head


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished train.py --decision-head --head-replay run")
    ap.add_argument("--lrs", default="0.5,1,2", help="learning rates to try")
    ap.add_argument("--lrs-no-std", default="4,16,64", help="learning rates to try with --no-adv-scale (the "
                    "advantages are the reward differences themselves, ~10x smaller than divided by their spread)")
    ap.add_argument("--passes", default="1,2,4,8", help="SGD steps over the remembered states per training step")
    ap.add_argument("--val-limit", type=int, default=None, help="val states (default: the run's --val-limit)")
    ap.add_argument("--also", default="", help="other runs (comma-separated) whose trained heads are scored on the "
                    "same val states, as they are (any --decision-head run with the same manager states)")
    ap.add_argument("--smoke", action="store_true", help="2 val states and one rule (the test suite)")
    cli = ap.parse_args()
    ckpt = cli.run / "checkpoint"
    rep, head_state = load_file(str(ckpt / decision.REPLAY_FILE)), load_file(str(ckpt / decision.FILE))
    args = run_args(cli.run)
    net, tok = M.load_model(args.model)
    args.decision_marker = decision_marker(tok)
    task = manager_task(args, tok, net)
    states, rows = val_table(net, tok, task, args, 2 if cli.smoke else cli.val_limit or args.val_limit)
    steps = int(rep["step"][-1]) + 1 if "step" in rep else len(rep["L"]) // args.questions_per_step
    print(f"{cli.run}: {len(rep['L'])} remembered training states ({steps} steps of {args.questions_per_step}), "
          f"{len(rows)} val states, {sum(s is not None for s in states)} with a memory shown")

    # the check: the run's own rule, replayed, ends at the run's own head (rollouts do not depend on w)
    own = replay(head_state, rep, args.questions_per_step, steps, args.lr, args.ppo_epochs, True)
    gap = (own.w.detach() - head_state["w"]).abs().max().item()
    print(f"replayed recipe against the run's head: max |w difference| = {gap:.2e} (|w| = {head_state['w'].norm():.3f})")

    print("\n| rule | advantages | lr | passes | decisions right | ADD turns | UPDATE turns | NONE turns | val reward |")
    print("|---|---|---|---|---|---|---|---|---|")
    def row(name: str, scale: bool, lr: float, passes: int, head) -> None:
        v = val_scores(head, states, rows)
        cell = lambda k: f"{v[k]:.3f} +- {v[k + '_se']:.3f} (n={v[k + '_n']})" if k in v else "-"  # noqa: E731
        print(f"| {name} | {'/ spread' if scale else 'r - V'} | {lr:g} | {passes} | {cell('op_acc')} | "
              f"{cell('op_acc_add')} | {cell('op_acc_update')} | {cell('op_acc_none')} | {cell('reward')} |")

    untrained = decision.DecisionHead(head_state["w"].numel())
    untrained.load_state_dict({**head_state, "w": torch.zeros_like(head_state["w"])})
    row("untrained", True, 0, 0, untrained)
    rules = [(name, scale, lr, p, keep) for scale, lrs in ((True, cli.lrs), (False, cli.lrs_no_std))
             for lr in map(float, lrs.split(",")) for p in map(int, cli.passes.split(","))
             for name, keep in (("replay", True), ("this step", False)) if keep or p == 1][:1 if cli.smoke else None]
    for name, scale, lr, p, keep in rules:
        row(name, scale, lr, p, replay(head_state, rep, args.questions_per_step, steps, lr, p, keep, scale))
    for other in filter(None, cli.also.split(",")):  # other runs' trained heads, as they are
        head = decision.DecisionHead(head_state["w"].numel())
        head.load_state_dict(load_file(str(Path(other) / "checkpoint" / decision.FILE)))
        row(f"{other}'s head", True, 0, 0, head)


if __name__ == "__main__":
    main()
