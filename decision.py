"""The Memory Manager's decision head: the first decision of the ops format, read from the state by a trained line.

Why (docs/manager.md, "A decision head"): in the ops format (prompts.py) each entry first names the memory the fact
is about, or "new". Every GRPO run on the whole network moved that decision's prior, shared by every state, faster
than its dependence on the state, and ended ADDing everything (or nothing). Yet the final hidden state at that slot
tells new facts from changes almost perfectly (a linear probe: AUC 0.999 on val); the LM head does not read it. So
the manager's policy at that slot gets a term that reads it:

    s(h)           = w . (h - mu) / sigma                  h [dim]: the final normed hidden state the LM head reads
    P(new | state) = sigmoid(L + s(h))                     L = log P_LM(way to "new") - log P_LM(a memory), T = 1

mu and sigma are the mean and spread of h over training states, fixed when training starts, and there is no bias:
s averages 0 over those states, so what w learns is how the decision depends on the state, never a push shared by
every state (what ran away in every run before). The arms are grammar.decision_arms': the tokens on the way to "new",
and a shown memory's first token. After the arm, the output is the frozen LM's, guided, within that arm. train.py
--decision-head trains w alone (576 numbers for SmolLM2) by the all-arms policy gradient on the outcome reward
(grpo.compute_all_arms_advantage); no operation label enters. Greedy decoding takes the likelier arm.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from grammar import ForcedArm, decision_arms
from grpo import compute_all_arms_advantage
from sampling import common_prefix

FILE = "decision_head.safetensors"  # beside model.safetensors in a checkpoint folder
REPLAY_FILE = "decision_replay.safetensors"  # --head-replay: every state the run has scored, beside it
FIT_STATES = 64  # training states whose hidden states fix the normaliser


class DecisionHead(torch.nn.Module):
    """s(h) = w . (h - mean) / std, added to the log-odds of "new" at the ops format's first decision slot."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))  # 0: the untrained head is the LM's own decision
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, dim] -> s [B]."""
        return ((h.float() - self.mean) / self.std) @ self.w

    def fit(self, h: torch.Tensor) -> None:
        """Set mean and std from the hidden states h [N, dim] of training states (standardised features: one
        learning rate suits every coordinate)."""
        self.mean.copy_(h.float().mean(0))
        self.std.copy_(h.float().std(0) + 1e-3 * h.float().std(0).mean())


def save_head(model, folder: Path) -> None:
    head = getattr(model, "decision_head", None)
    if head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(Path(folder) / FILE))
        if getattr(head, "replay", None):
            save_file({k: v.contiguous() for k, v in head.replay.items()}, str(Path(folder) / REPLAY_FILE))


def load_head(model, folder) -> bool:
    """Attach the checkpoint's decision head to `model` (a manager checkpoint trained with --decision-head)."""
    path = Path(folder) / FILE
    if not path.is_file():
        return False
    state = load_file(str(path))
    model.decision_head = DecisionHead(state["w"].numel()).to(model.lm_head.weight.device)
    model.decision_head.load_state_dict(state)
    if (Path(folder) / REPLAY_FILE).is_file():  # a --head-replay run's scored states, for --resume
        model.decision_head.replay = load_file(str(Path(folder) / REPLAY_FILE))
    return True


def slot(prompt: list[int], guide, marker: int):
    """(ids up to the first decision slot, its guide state, arm masks "new" / a memory [V]), or None when no memory
    is shown there (the format allows only "new")."""
    state, position, new, memory = decision_arms(guide, marker)
    if not memory.any():
        return None
    ids, s = list(prompt), guide.start
    for _ in range(position):  # the way there is forced: one allowed token at each position
        token = int(guide.allowed(s).nonzero()[0, 0])
        ids.append(token)
        s = guide.advance(s, token)
    return ids, state, new, memory


@torch.no_grad()
def slot_states(model, slots: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(L [B]: the LM's log-odds of "new" at temperature 1, h [B, dim]) at each slot. The prompts' common prefix
    (the system prompt and worked examples: ~900 of ~1,070 tokens) runs once into a KV cache, and each prompt's
    rest is appended after it in turn, overwriting the last one's (one row at a time: no padding to mask)."""
    dev, L, H = model.lm_head.weight.device, [], []
    rows = [ids for ids, *_ in slots]
    shared = common_prefix([tuple(r) for r in rows]) if len(rows) > 1 else 0
    cache = model.new_cache(1, max(map(len, rows)))
    if shared:
        model.hidden_states(torch.tensor([rows[0][:shared]], device=dev), cache=cache)
    filled, next_pos = cache.len, cache.next_pos.clone()
    for ids, _, new, memory in slots:
        cache.len, cache.next_pos = filled, next_pos.clone()  # back to the prefix alone
        h = model.hidden_states(torch.tensor([ids[shared:]], device=dev), cache=cache)[0, -1]  # [dim]
        z = model.lm_head(h[None])[0].float()  # [V]
        L.append(torch.logsumexp(z[new.to(dev)], 0) - torch.logsumexp(z[memory.to(dev)], 0))
        H.append(h.float())
    return torch.stack(L).cpu(), torch.stack(H).cpu()


def arm_logp(head: DecisionHead, L: torch.Tensor, h: torch.Tensor, arms: torch.Tensor) -> torch.Tensor:
    """log P(arm) for arms [B] (0 "new", 1 a memory) in states (L [B], h [B, dim]): a differentiable function of w."""
    logit = L.to(h.device) + head(h)
    return torch.nn.functional.logsigmoid(torch.where(arms.to(h.device) == 0, logit, -logit))


def head_loss(head: DecisionHead, states: list, arms: list, advantages: list) -> torch.Tensor:
    """The all-arms policy-gradient loss on the first decision alone: -mean_i A_i log P(a_i | state_i).
    states: per group (L, h) or None (no memory shown: nothing to decide); arms, advantages: per group [G]."""
    terms = [-(a * arm_logp(head, s[0].expand(len(r)), s[1].expand(len(r), -1), r)).sum()
             for s, r, a in zip(states, arms, advantages) if s is not None]
    n = sum(len(r) for r in arms)
    return torch.stack(terms).sum() / n if terms else torch.zeros((), requires_grad=True)


def _states(model, prompts: list, guides: list, marker: int) -> tuple[list, list]:
    """Per prompt: its slot (see slot) and (L, h) there, both None where no memory is shown."""
    slots = [slot(p, g, marker) for p, g in zip(prompts, guides)]
    real = iter(zip(*slot_states(model, [s for s in slots if s is not None]))) if any(slots) else iter(())
    return slots, [None if s is None else next(real) for s in slots]


@torch.no_grad()
def _logits(head: DecisionHead, states: list) -> Iterator[float]:
    """The policy's log-odds of "new", L + s(h), one per state that is not None, in order."""
    real = [st for st in states if st is not None]
    if not real:
        return iter(())
    L, h = torch.stack([L for L, _ in real]), torch.stack([h for _, h in real])  # [B], [B, dim]
    return iter((L + head(h.to(head.w.device)).cpu()).tolist())


def greedy_guides(model, prompts: list[list[int]], guides: list, marker: int) -> list:
    """Greedy decoding under the head: each guide restricted, at its first decision slot, to the arm the policy
    finds likelier (L + s(h) > 0: "new"); guides without a memory shown, or a model without a head, unchanged."""
    if getattr(model, "decision_head", None) is None:
        return guides
    slots, states = _states(model, prompts, guides, marker)
    logit = _logits(model.decision_head, states)
    return [g if s is None else ForcedArm(g, s[1], s[2] if next(logit) > 0 else s[3]) for g, s in zip(guides, slots)]


def force_arm(prompt: list[int], guide, marker: int, new: bool):
    """The guide with its first decision made: "new" (new=True) or a memory; unchanged where no memory is shown.
    (evaluate.py --manager-arm: the oracle's arm instead of the head's, a decision head's ceiling.)"""
    s = slot(prompt, guide, marker)
    return guide if s is None else ForcedArm(guide, s[1], s[2] if new else s[3])


def states_at_slots(model, examples, marker: int) -> list:
    """Per example (anything with .prompt and .guide): (L, h) at its first decision slot, or None (no memory shown)."""
    return _states(model, [ex.prompt for ex in examples], [ex.guide for ex in examples], marker)[1]


def mark_rollout(model, groups: list, marker: int) -> None:
    """train.py --decision-head, after sampling: each group's state at its slot, kept for the update (g.slot), and
    log P("new") there under the head (g.logp_new: the all-arms advantage's weight, grpo.compute_all_arms_advantage).
    The head's own probability: no loss pass over the network is needed."""
    states = states_at_slots(model, groups, marker)
    logit = _logits(model.decision_head, states)
    for g, st in zip(groups, states):
        g.slot = st
        g.logp_new = torch.tensor(0.0) if st is None else torch.nn.functional.logsigmoid(torch.tensor(next(logit)))


def head_step(model, opt, groups: list, max_norm: float, replay_passes: int = 0, scale: bool = True) -> dict:
    """train.py --decision-head's update: one optimizer step on w alone (the network is frozen), the all-arms loss
    on the first decision of each output, -mean_i A_i log P(a_i | state) (head_loss). With --head-replay
    (replay_passes > 0): the step's states join every earlier one and the update is replay_step's instead."""
    head = model.decision_head
    if replay_passes:
        remember(head, groups)
        return replay_step(head, opt, max_norm, replay_passes, scale)
    loss = head_loss(head, [g.slot for g in groups], [g.arms for g in groups], [g.advantages[:, 0] for g in groups])
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([head.w], max_norm).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": loss.item(), "grad_norm": grad_norm, "head_w_norm": head.w.norm().item()}


def remember(head: DecisionHead, groups: list) -> None:
    """--head-replay: append this step's scored states to head.replay, a dict of tensors: L [n], h [n, dim] at the
    slot, per output arms [n, G] and rewards [n, G], and the update each state joined at, step [n] (0, 1, ...).
    Groups with no memory shown (nothing to decide) are left out; a step that shows none is not numbered."""
    old = getattr(head, "replay", None) or {}
    step = int(old["step"][-1]) + 1 if old else 0
    real = [g for g in groups if g.slot is not None]
    if not real:
        return
    new = {"L": torch.stack([g.slot[0] for g in real]).float(), "h": torch.stack([g.slot[1] for g in real]).float(),
           "arms": torch.stack([g.arms.cpu() for g in real]),
           "rewards": torch.tensor([[s["reward"] for s in g.scores] for g in real], dtype=torch.float32),
           "step": torch.full((len(real),), step)}
    head.replay = {k: torch.cat([old[k], v]) if k in old else v for k, v in new.items()}


def replay_step(head: DecisionHead, opt, max_norm: float, passes: int = 1, scale: bool = True) -> dict:
    """--head-replay's update: `passes` optimizer steps on w, each on every state the run has scored so far.

    Why this is sound: the network is frozen and the head moves only the first decision, so the reward of an arm
    in a state does not depend on w; what a state's outputs measured (each arm's rewards) stays a fair sample
    however far w has moved. The all-arms gradient sum_a pi_w(a) (R_a - V) grad log pi_w(a) needs nothing else,
    so it is recomputed at the current w over every remembered state (grpo.compute_all_arms_advantage with
    today's pi_w): the gradient of the mean expected reward over all of them, not over this step's 8 alone."""
    rep = getattr(head, "replay", None)
    if not rep or not len(rep["L"]):  # nothing scored yet with a memory shown: nothing to decide, no step
        return {"loss": 0.0, "grad_norm": 0.0, "head_w_norm": head.w.norm().item(), "replay_states": 0}
    n, G = rep["arms"].shape  # [n, G]
    dev = head.w.device
    L, h = rep["L"].to(dev).repeat_interleave(G), rep["h"].to(dev).repeat_interleave(G, 0)  # [n * G], [n * G, dim]
    arms = rep["arms"].to(dev).flatten()  # [n * G]
    stats = {}
    for _ in range(passes):
        logp = arm_logp(head, L, h, arms)  # log pi_w(a_i): the loss's term, and (detached) the advantages' weight
        adv = compute_all_arms_advantage(rep["rewards"].flatten(), arms, logp.detach(), G, scale)
        loss = -(adv.to(dev) * logp).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([head.w], max_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = {"loss": loss.item(), "grad_norm": grad_norm}
    return {**stats, "head_w_norm": head.w.norm().item(), "replay_states": n}


def attach(model, ckpt: Path | None, examples: list, marker: int) -> None:
    """train.py --decision-head: the checkpoint's head, or a new one (w = 0) whose normaliser is fit on the first
    FIT_STATES of `examples` (a shuffle of the training states) that show a memory; then only w trains."""
    if ckpt is not None:
        if not load_head(model, ckpt):
            raise SystemExit(f"{ckpt}: no {FILE} to resume (the run was not started with --decision-head)")
    else:
        slots = [s for s in (slot(ex.prompt, ex.guide, marker) for ex in examples[:4 * FIT_STATES]) if s][:FIT_STATES]
        _, h = slot_states(model, slots)
        model.decision_head = DecisionHead(h.shape[1]).to(model.lm_head.weight.device)
        model.decision_head.fit(h.to(model.lm_head.weight.device))
    model.requires_grad_(False)
    model.decision_head.w.requires_grad_(True)
