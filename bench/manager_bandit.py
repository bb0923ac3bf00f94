"""The manager's first decision as a bandit, to measure the optimiser in minutes instead of a 15-minute run.

    python bench/manager_bandit.py                                  # Adam, lr 1e-5, reward right on 75 % of states
    python bench/manager_bandit.py --hold-prior --steps 64
    python bench/manager_bandit.py --optimizer sgd --lr 1e-2 --reliability 1.0
    python bench/manager_bandit.py --hold-prior --optimizer sgd --lr 0.1 --head-lr-scale 0 --seed 1
    python bench/manager_bandit.py --hold-prior --optimizer sgd --lr 0.1 --decision-entropy 1.0   # + entropy bonus
    python bench/manager_bandit.py --all-arms --optimizer sgd --lr 0.1 --head-lr-scale 0   # every arm tried
    python bench/manager_bandit.py --all-arms --hold-mean --mean-target 0 --optimizer sgd --lr 0.1 --head-lr-scale 0
    python bench/manager_bandit.py --smoke                          # 2 steps on one conversation (the tests)

What it keeps of train.py's manager: the real SmolLM2 policy, the gym's states (oracle banks, the 2 memories
MiniLM shows, the "ops" format's forced prefix up to the "about" slot; train split, --balance-kinds' ADD and
change states), GRPO's group-normalised advantages (grpo.py), --decision-temperature, --hold-prior
(grpo.project_out_choices, --prior-keep), --all-arms (grpo.compute_all_arms_advantage), --hold-mean and
--mean-target (grpo.hold_along on the gradient of the step's states' mean log-odds of "new", as
agents.hold_decision_prior does in train.py), the optimiser (checkpoint.make_optimizer: AdamW or SGD, --head-lr-scale).
An optional bonus on the entropy of "new or not" at the decision temperature (--decision-entropy; of the
step's mean P(new), or of each state's) is the bandit's own: train.py has none. What it replaces: the whole
output by its first choice, "new" or a shown memory's first token (a bandit with one arm per allowed
token), and the frozen answerer's reward by a label-based one, 1 for "new" on an ADD state and for a memory
on a change state, else 0, inverted on a seeded (1 - reliability) share of the states. That share stands
for the states where the real outcome reward does not put the right decision first (docs/manager.md: the
oracle is strictly best on 67 % of the ADD and 80 % of the change turns), so the inversion is per state,
the same at every step.

So it is not a result about the manager: it asks whether the optimiser can learn the conditional decision
from a reward this reliable in so many steps of Q states x G samples, and how fast the shared prior of "new"
moves against it. Greedy validation on the val split's ADD and change states (the decision at temperature 1,
argmax over the allowed tokens) every --val-every steps: the share of ADD states answered "new", of change
states answered with a memory, and the mean log-odds of "new" over both (the shared prior). One JSON line a
validation to --out. Settings are read on train and val, never on test.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data.gym as gym  # noqa: E402
from agents import balanced_states, conversation_facts, manager_examples, oracle_kind  # noqa: E402
from grpo import (compute_all_arms_advantage, compute_grpo_outcome_advantage, hold_along,  # noqa: E402
                  project_out_choices)
from memory import make_embedder  # noqa: E402
from metrics import standard_error  # noqa: E402
from model import OFFLINE_SMOLLM2, load_model  # noqa: E402
from parallel import clip_gradients  # noqa: E402
from checkpoint import make_optimizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from manager_priors import auc  # noqa: E402


def arms(tok, example) -> tuple[list[int], list[int], list[bool], bool]:
    """(prompt + forced prefix ids, the allowed token ids at the about slot, which of them start "new", whether
    "new" is the right choice here). Read by bytes, not by decision.slot, so any tokenizer works (the tests run
    this on a tiny one that splits "new")."""
    ids, state = list(example.prompt), example.guide.start
    while int(example.guide.allowed(state).sum()) == 1:  # the forced run up to the first choice
        ids.append(int(example.guide.allowed(state).nonzero()[0, 0]))
        state = example.guide.advance(state, ids[-1])
    choices = example.guide.allowed(state).nonzero()[:, 0].tolist()
    return ids, choices, ['new"'.startswith(tok.decode([t])) for t in choices], oracle_kind(example) == "ADD"


def states_of(split: str, limit: int, tok, vocab: int, embedder) -> list:
    """The split's ADD and change states, as --balance-kinds takes them on train (all of them on val)."""
    convs = [c for c in gym.load_conversations() if gym.split_of(c.sample_id) == split][:limit or None]
    examples = [ex for conv in convs for ex in manager_examples(conv, [], conversation_facts(conv, "observation"), tok,
                                                                embedder, k=2, vocab_size=vocab, fmt="ops")
                if ex.meta["id_map"]]
    if split == "train":
        examples = balanced_states(examples)
    else:
        examples = [ex for ex in examples if oracle_kind(ex) in ("ADD", "UPDATE change")]
    return [arms(tok, ex) for ex in examples]


def arm_logits(model, batch: list) -> list[torch.Tensor]:
    """Logits of each state's allowed tokens at its about slot (one forward of the padded batch)."""
    n = max(len(ids) for ids, *_ in batch)
    x = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, (ids, *_) in enumerate(batch):  # left-padded: every state's last position is its about slot
        x[i, n - len(ids):], mask[i, n - len(ids):] = torch.tensor(ids), 1
    logits = model(x, attention_mask=mask, last_only=True)[:, -1].float()  # [B, V]
    return [logits[i, choices] for i, (_, choices, _, _) in enumerate(batch)]


def arm_logprobs(model, batch: list, temperature: float) -> list[torch.Tensor]:
    """Log-probs over each state's allowed tokens at its about slot, at the temperature."""
    return [torch.log_softmax(z / temperature, -1) for z in arm_logits(model, batch)]


def log_odds_new(logits: torch.Tensor, is_new: list[bool]) -> torch.Tensor:
    """log P(new) - log P(a memory) at temperature 1, from the allowed tokens' logits."""
    new = torch.tensor(is_new)
    return torch.logsumexp(logits[new], 0) - torch.logsumexp(logits[~new], 0)


@torch.no_grad()
def validate(model, states: list, batch: int = 16) -> dict:
    """Greedy first decisions on val: ADD states answered new, change states answered with a memory, the mean
    log-odds of new (temperature 1: the shared prior) and their AUC, ADD against change (what tells them apart)."""
    odds = {True: [], False: []}  # right_new -> log-odds of new
    for i in range(0, len(states), batch):
        chunk = states[i:i + batch]
        for z, (_, _, is_new, right_new) in zip(arm_logits(model, chunk), chunk):
            odds[right_new].append(float(log_odds_new(z, is_new)))
    add, change = [float(x > 0) for x in odds[True]], [float(x <= 0) for x in odds[False]]
    every = odds[True] + odds[False]
    return {"add_right": sum(add) / len(add), "add_se": standard_error(add),
            "change_right": sum(change) / len(change), "change_se": standard_error(change),
            "log_odds_new": sum(every) / len(every), "auc": auc(odds[True], odds[False])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=OFFLINE_SMOLLM2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--questions-per-step", type=int, default=4, help="states a step (train.py's cpu preset: 4)")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    ap.add_argument("--decision-temperature", type=float, default=2.5, help="the about slot's sampling temperature")
    ap.add_argument("--all-arms", action="store_true", help="each group's outputs alternate between new and a memory, "
                    "reweighted by the policy's probability of each (grpo.compute_all_arms_advantage), not sampled")
    ap.add_argument("--hold-prior", action="store_true", help="grpo.project_out_choices on the advantages")
    ap.add_argument("--prior-keep", type=float, default=0.0, help="with --hold-prior: the prior's push kept, a share")
    ap.add_argument("--hold-mean", action="store_true", help="grpo.hold_along: the step cannot move the mean over "
                    "its states of the log-odds of new (temperature 1), to first order (SGD)")
    ap.add_argument("--mean-target", type=float, default=None,
                    help="with --hold-mean: move that mean a share --mean-rate of the way to this value each step")
    ap.add_argument("--mean-rate", type=float, default=0.5)
    ap.add_argument("--decision-entropy", type=float, default=0.0,
                    help="weight of the entropy of the step's mean P(new) (at the decision temperature), maximised")
    ap.add_argument("--entropy-of", choices=("marginal", "state"), default="marginal",
                    help="--decision-entropy of the step's mean P(new), or the mean over states of each one's")
    ap.add_argument("--head-lr-scale", type=float, default=1.0,
                    help="the output layer's lr over --lr (tied to the input embedding here); 0 freezes it")
    ap.add_argument("--reliability", type=float, default=0.75, help="share of train states whose reward is right")
    ap.add_argument("--val-every", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="the JSONL log (default runs/bandit.jsonl; --smoke: a temporary file)")
    ap.add_argument("--smoke", action="store_true", help="one conversation per split, 2 steps")
    a = ap.parse_args()
    if a.hold_mean and a.optimizer != "sgd":
        ap.error("--hold-mean needs --optimizer sgd (AdamW rescales each coordinate, so its step is not -lr g)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # both cores, unless told fewer
    torch.manual_seed(a.seed)
    model, tok = load_model(a.model)
    embedder, vocab, limit = make_embedder("minilm"), model.lm_head.weight.shape[0], 1 if a.smoke else 0
    train, val = states_of("train", limit, tok, vocab, embedder), states_of("val", limit, tok, vocab, embedder)
    rng = random.Random(f"{a.seed}-bandit")
    inverted = set(rng.sample(range(len(train)), round((1 - a.reliability) * len(train))))
    opt = make_optimizer(model, a.lr, a.optimizer, a.head_lr_scale, weight_decay=0.0)
    steps = 2 if a.smoke else a.steps
    out = Path(a.out or (tempfile.mkdtemp() + "/bandit.jsonl" if a.smoke else "runs/bandit.jsonl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out, "w")

    def record(step, extra):
        row = {"step": step, **validate(model, val), **extra}
        log.write(json.dumps(row) + "\n")
        log.flush()
        tqdm.write(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))

    print(f"{len(train)} train states ({len(inverted)} with the reward inverted), {len(val)} val states; "
          f"{a.optimizer} lr {a.lr}, Q {a.questions_per_step} x G {a.group_size}, hold-prior {a.hold_prior} "
          f"(keep {a.prior_keep}), head lr x {a.head_lr_scale}, all arms {a.all_arms}")
    record(0, {})
    order = list(range(len(train)))
    t0, step_odds = time.perf_counter(), []  # the step's states' mean log-odds of new before each update
    for step in tqdm(range(1, steps + 1), desc="bandit steps"):
        picks = []
        for i in range((step - 1) * a.questions_per_step, step * a.questions_per_step):
            if i % len(train) == 0:  # a fresh shuffle at the start of each pass over the states
                rng.shuffle(order)
            picks.append(order[i % len(train)])
        batch = [train[i] for i in picks]
        logits = arm_logits(model, batch)
        logps = [torch.log_softmax(z / a.decision_temperature, -1) for z in logits]
        chosen, rewards, made, tried = [], [], [], []
        for i, lp, (_, _, is_new, right_new) in zip(picks, logps, batch):
            if a.all_arms:  # "new" and "a memory" alternate (grammar.arm_guides); log pi of each arm
                new = torch.arange(a.group_size) % 2 == 0  # [G] bool
                mask = torch.tensor(is_new)
                chosen.append(torch.where(new, torch.logsumexp(lp[mask], 0), torch.logsumexp(lp[~mask], 0)))
                tried.append((~new).long())
            else:
                arm = torch.multinomial(lp.exp().detach(), a.group_size, replacement=True)  # [G]
                new = torch.tensor(is_new)[arm]  # [G] bool
                chosen.append(lp[arm])
            right = (new == right_new).float()
            rewards.append(1 - right if i in inverted else right)
            made.append(torch.stack([new.float(), 1 - new.float()], -1))  # [G, 2]: the decision made
        rewards = torch.cat(rewards)  # [Q * G]
        if a.all_arms:
            adv = compute_all_arms_advantage(rewards, torch.cat(tried), torch.cat(chosen).detach(), a.group_size)
        else:
            adv = compute_grpo_outcome_advantage(rewards, a.group_size)
        share = 0.0
        if a.hold_prior:
            adv, share = project_out_choices(adv, torch.cat(made), a.group_size, a.prior_keep)
        loss = -(adv * torch.cat(chosen)).mean()  # the clipped surrogate's gradient at ratio 1 (on-policy)
        if a.decision_entropy:
            p_new = torch.stack([torch.logsumexp(lp[torch.tensor(b[2])], 0) for lp, b in zip(logps, batch)]).exp()  # [Q]
            if a.entropy_of == "marginal":  # of the step's mean decision: only the shared prior is pushed
                p_new = p_new.mean()
            entropy = -(p_new * p_new.log() + (1 - p_new) * (1 - p_new).log()).mean()  # new or not, in nats
            loss = loss - a.decision_entropy * entropy
        opt.zero_grad()
        loss.backward(retain_graph=a.hold_mean)
        held = 0.0
        step_odds.append(round(sum(float(log_odds_new(z.detach(), b[2])) for z, b in zip(logits, batch)) / len(batch), 3))
        if a.hold_mean:  # the step's states' mean log-odds of new, held (or moved towards --mean-target)
            mean_odds = torch.stack([log_odds_new(z, b[2]) for z, b in zip(logits, batch)]).mean()
            params = [p for p in model.parameters() if p.requires_grad]
            direction = torch.autograd.grad(mean_odds, params, allow_unused=True)
            move = 0.0 if a.mean_target is None else a.mean_rate * (a.mean_target - mean_odds.item())
            held = hold_along(params, direction, move, a.lr)
        grad_norm = clip_gradients(opt, 1.0)  # train.py's --grad-clip
        opt.step()
        if step % a.val_every == 0 or step == steps:
            p_new = [float(torch.logsumexp(lp.detach()[torch.tensor(b[2])], 0).exp()) for lp, b in zip(logps, batch)]
            record(step, {"sampled_new": float(torch.cat(made)[:, 0].mean()), "p_new": sum(p_new) / len(p_new), "adv_prior_share": share, "held_cos": held, "step_odds": step_odds, "grad_norm": grad_norm,
                          "s": round(time.perf_counter() - t0, 1)})
            step_odds = []
    log.close()


if __name__ == "__main__":
    main()
