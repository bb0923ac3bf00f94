"""The Memory Manager's small-model recipe: a frozen LM whose first decision is read from its state by a trained line.

    python train.py --algo grpo --agent manager --decision-head      # the recipe (flags.DECISION_HEAD)

Why (docs/manager.md): in the ops format (prompts.py) each entry first names the memory the fact is about, or
"new". Every GRPO run on the whole 135M network moved that decision's prior, shared by every state, faster than its
dependence on the state, and ended ADDing everything (or nothing). Yet the final hidden state at that slot tells
new facts from changes almost perfectly (a linear probe: AUC 0.999 on val); the LM head does not read it. So the
policy at that slot gets a term that reads it, and only that term trains:

    s(h)           = w . (h - mu) / sigma           h [dim]: the final normed hidden state the LM head reads
    P(new | state) = sigmoid(L + s(h))              L = log P_LM(way to "new") - log P_LM(a memory), T = 1

mu and sigma are the mean and spread of h over training states, fixed when training starts, and there is no bias:
s averages 0 over those states, so w can only learn how the decision depends on the state, never a push shared by
every state. After the decision the output is the frozen LM's, guided, within that arm.

The update (paper section 3's outcome reward; the gradient is the "all-action" policy gradient, Sutton et al.
2001, Allen et al. 2017's Mean Actor-Critic): the G outputs of a state take the two arms in turn, so every arm is
tried in every state (GRPO would rarely try an arm the policy has nearly given up), and the policy's own P(arm)
reweights them (all_arms_advantage). No operation label enters the reward. The frozen LM writes the rest of each
arm greedily, as it does at evaluation (flags.DECISION_HEAD: temperature 0, G = 2): the policy being trained is the
one deployed, and an arm's reward is a function of the state alone. Sampled at temperature 1 instead, one output
per arm carried the noise of every later token, and the head read the state worse (docs/manager.md).

The pieces, in order: 1. the decision slot of a format and its two arms; 2. the head and the states it reads;
3. decisions at evaluation; 4. one training step. Read next: prompts.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from grpo import zero_std_group_fraction
from metrics import mean_scores, standard_error
from prefixcache import prefix_segment, split_point
from sampling import generate

FILE = "decision_head.safetensors"  # beside model.safetensors in a checkpoint folder
FIT_STATES = 64  # training states whose hidden states fix the normaliser
MAX_CHOICES = 64  # a decision slot offers "new" among at most this many tokens (free text allows thousands)

# --------------------------------------------------------------------------------------------------
# 1. The first decision slot of the ops format, and its two arms
# --------------------------------------------------------------------------------------------------


def first_decision(guide, marker: int, limit: int = 512) -> tuple[int, int]:
    """(state, position) of a format's first decision slot: follow the forced tokens from the start to the first
    state that offers `marker` ("new") among a few tokens; `position` counts the tokens before it (the same in every
    output, since the way there is forced)."""
    state = guide.start
    for position in range(limit):
        mask = guide.allowed(state)
        if mask[marker] and mask.sum() <= MAX_CHOICES:
            return state, position
        if mask.sum() != 1:
            break
        state = guide.advance(state, int(mask.nonzero()[0, 0]))
    raise ValueError(f"the format offers a choice before any decision slot (or none within {limit} tokens): the "
                     "decision head needs the ops format, whose way to its first decision is forced")


def decision_arms(guide, marker: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """(state, position, arm 0, arm 1) at the first decision slot: arm 0 masks the tokens on the way to "new" (the
    marker or its prefixes "n", "ne"), arm 1 every other token allowed there (a shown memory's first token; none
    when no memory is shown). [V] bool masks."""
    state, position = first_decision(guide, marker)
    allowed, data = guide.allowed(state), guide.vocab.data
    way = data[marker] + guide.automaton.forced(guide.automaton.walk(state, data[marker]))  # b'new", "event": ...'
    new = torch.zeros_like(allowed)
    new[[t for t in allowed.nonzero()[:, 0].tolist() if way.startswith(data[t])]] = True
    return state, position, new, allowed & ~new


class ForcedArm:
    """A guide that allows only the tokens `only` at the decision state `state` and is `guide` everywhere else."""

    def __init__(self, guide, state: int, only: torch.Tensor):
        self.guide, self.state, self.only, self.start, self.stop_ids = guide, state, only, guide.start, guide.stop_ids

    def allowed(self, state: int) -> torch.Tensor:
        return self.only if state == self.state else self.guide.allowed(state)

    def advance(self, state: int, token: int) -> int:
        return self.guide.advance(state, token)


def arm_guides(guide, marker: int, group_size: int) -> tuple[list, torch.Tensor]:
    """A state's G guides, the arms alternating over the outputs ("new", a memory, "new", ...), and each output's arm
    [G]. A state with no memory shown allows only "new" there: every output keeps the format's guide, arm 0."""
    state, _, *masks = decision_arms(guide, marker)
    if not masks[1].any():
        return [guide] * group_size, torch.zeros(group_size, dtype=torch.long)
    arms = torch.arange(group_size) % 2
    return [ForcedArm(guide, state, masks[j]) for j in arms.tolist()], arms


# --------------------------------------------------------------------------------------------------
# 2. The head, and the states it reads
# --------------------------------------------------------------------------------------------------


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


def load_head(model, folder) -> bool:
    """Attach the checkpoint's decision head to `model` (a manager checkpoint trained with --decision-head)."""
    path = Path(folder) / FILE
    if not path.is_file():
        return False
    state = load_file(str(path))
    model.decision_head = DecisionHead(state["w"].numel()).to(model.lm_head.weight.device)
    model.decision_head.load_state_dict(state)
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
    (the system prompt and worked examples: ~900 of ~1,070 tokens) is a shared segment (prefixcache.prefix_segment:
    computed once while the network is frozen), and each prompt's rest is appended after it in turn, overwriting
    the last one's (one row at a time: no padding to mask)."""
    dev, L, H = model.lm_head.weight.device, [], []
    rows = [ids for ids, *_ in slots]
    shared = split_point(model, list(dict.fromkeys(tuple(r) for r in rows)))
    above = [prefix_segment(model, tuple(rows[0][:shared]))] if shared else []
    cache = model.new_cache(1, max(map(len, rows)) - shared, above)
    for ids, _, new, memory in slots:
        cache.len, cache.next_pos[:] = 0, shared  # back to the prefix alone
        h = model.hidden_states(torch.tensor([ids[shared:]], device=dev), cache=cache)[0, -1]  # [dim]
        z = model.lm_head(h[None])[0].float()  # [V]
        L.append(torch.logsumexp(z[new.to(dev)], 0) - torch.logsumexp(z[memory.to(dev)], 0))
        H.append(h.float())
    return torch.stack(L).cpu(), torch.stack(H).cpu()


def _states(model, prompts: list, guides: list, marker: int) -> tuple[list, list]:
    """Per prompt: its slot (see slot) and (L, h) there, both None where no memory is shown."""
    slots = [slot(p, g, marker) for p, g in zip(prompts, guides)]
    real = iter(zip(*slot_states(model, [s for s in slots if s is not None]))) if any(slots) else iter(())
    return slots, [None if s is None else next(real) for s in slots]


def states_at_slots(model, examples, marker: int) -> list:
    """Per example (anything with .prompt and .guide): (L, h) at its first decision slot, or None (no memory shown)."""
    return _states(model, [ex.prompt for ex in examples], [ex.guide for ex in examples], marker)[1]


def arm_logp(head: DecisionHead, L: torch.Tensor, h: torch.Tensor, arms: torch.Tensor) -> torch.Tensor:
    """log P(arm) for arms [B] (0 "new", 1 a memory) in states (L [B], h [B, dim]): a differentiable function of w."""
    logit = L.to(h.device) + head(h)
    return torch.nn.functional.logsigmoid(torch.where(arms.to(h.device) == 0, logit, -logit))


@torch.no_grad()
def _logits(head: DecisionHead, states: list) -> list[float]:
    """The policy's log-odds of "new", L + s(h), one per state that is not None, in order."""
    real = [st for st in states if st is not None]
    if not real:
        return []
    L, h = torch.stack([L for L, _ in real]), torch.stack([h for _, h in real])  # [B], [B, dim]
    return (L + head(h.to(head.w.device)).cpu()).tolist()


# --------------------------------------------------------------------------------------------------
# 3. Decisions at evaluation: the head's likelier arm, or one given from outside
# --------------------------------------------------------------------------------------------------


def greedy_guides(model, prompts: list[list[int]], guides: list, marker: int) -> list:
    """Greedy decoding under the head: each guide restricted, at its first decision slot, to the arm the policy
    finds likelier (L + s(h) > 0: "new"); guides without a memory shown, or a model without a head, unchanged."""
    if getattr(model, "decision_head", None) is None:
        return guides
    slots, states = _states(model, prompts, guides, marker)
    logit = iter(_logits(model.decision_head, states))
    return [g if s is None else ForcedArm(g, s[1], s[2] if next(logit) > 0 else s[3]) for g, s in zip(guides, slots)]


def force_arm(prompt: list[int], guide, marker: int, new: bool):
    """The guide with its first decision made: "new" (new=True) or a memory; unchanged where no memory is shown.
    (evaluate.py --manager-arm: the oracle's arm instead of the head's, a decision head's ceiling.)"""
    s = slot(prompt, guide, marker)
    return guide if s is None else ForcedArm(guide, s[1], s[2] if new else s[3])


# --------------------------------------------------------------------------------------------------
# 4. Training: the all-arms advantage, the loss, one step
# --------------------------------------------------------------------------------------------------


def all_arms_advantage(rewards: torch.Tensor, arms: torch.Tensor, arm_logp: torch.Tensor, group_size: int,
                       scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages for groups whose outputs were given the arms in turn (arm_guides).

    An arm given to m_a of the G outputs is weighted by the importance weight pi(a) / (m_a / G). Per group, with
    w_i = pi(a_i) / m_{a_i} normalised to sum 1 over the arms tried:

        V   = sum_i w_i r_i                       the policy's expected reward (its baseline)
        A_i = G w_i (r_i - V) / (std_w + eps)      std_w^2 = sum_i w_i (r_i - V)^2   (scale=False: no std)

    so sum_i A_i grad log pi(a_i) / G = sum_a pi(a) (R_a - V) grad log pi(a) / std_w: the exact gradient of the
    expected reward over the decision, given each arm's mean reward R_a.
    rewards, arms (ints), arm_logp (log pi(a_i), no gradient) are [N], group by group -> advantages [N].
    """
    G = group_size
    if rewards.numel() % G or arms.numel() != rewards.numel() or arm_logp.numel() != rewards.numel():
        raise ValueError(f"need one arm and one log-prob per reward, in whole groups (rewards {rewards.numel()}, "
                         f"arms {arms.numel()}, arm_logp {arm_logp.numel()}, group_size {G})")
    r = rewards.double().view(-1, G)  # [groups, G]
    a = arms.view(-1, G)
    same = (a[:, :, None] == a[:, None, :]).double()  # [groups, G, G]: outputs given the same arm
    w = arm_logp.double().view(-1, G).exp() / same.sum(-1)  # pi(a_i) / m_{a_i}
    w = w / w.sum(-1, keepdim=True)  # the arms a group tried carry all its weight
    value = (w * r).sum(-1, keepdim=True)  # [groups, 1]
    adv = G * w * (r - value)
    if scale:
        adv = adv / ((w * (r - value).square()).sum(-1, keepdim=True).sqrt() + eps)
    return adv.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def head_loss(head: DecisionHead, states: list, arms: list, advantages: list) -> torch.Tensor:
    """The policy-gradient loss on the first decision alone: -mean_i A_i log P(a_i | state_i).
    states: per group (L, h) or None (no memory shown: nothing to decide); arms, advantages: per group [G]."""
    terms = [-(a * arm_logp(head, s[0].expand(len(r)), s[1].expand(len(r), -1), r)).sum()
             for s, r, a in zip(states, arms, advantages) if s is not None]
    n = sum(len(r) for r in arms)
    return torch.stack(terms).sum() / n if terms else torch.zeros((), requires_grad=True)


@torch.no_grad()
def sample_groups(model, tok, task, examples: list, seed: int, args, marker: int) -> list[dict]:
    """Per example: G outputs of the frozen LM, the arms alternating at the first decision, and their scores."""
    G, out = args.group_size, []
    for i in range(0, len(examples), args.rollout_batch):
        chunk = examples[i:i + args.rollout_batch]
        arms = [arm_guides(ex.guide, marker, G) for ex in chunk]
        tokens = generate(model, [ex.prompt for ex in chunk for _ in range(G)], args.max_new_tokens, args.temperature,
                          args.top_p, seed=seed + i, guide=[g for guides, _ in arms for g in guides])
        out += [{"example": ex, "arms": a, "lengths": [len(t) for t in tokens[j * G:(j + 1) * G]],
                 "texts": [tok.decode(t) for t in tokens[j * G:(j + 1) * G]]} for j, (ex, (_, a)) in enumerate(zip(chunk, arms))]
    for group, scores in zip(out, task.score_all([(g["example"], g["texts"]) for g in out])):
        group["scores"], group["rewards"] = scores, torch.tensor([s["reward"] for s in scores])
    return out


def train_step(model, opt, tok, task, examples: list, step: int, args, marker: int) -> dict:
    """train.py --decision-head's step: sample and score every arm of the step's states, then one step on w alone.

    With DAPO's dynamic sampling (args.dynamic_sampling R) `examples` holds 1 + R rounds of questions_per_step
    states, sampled until questions_per_step show rewards that differ (a state whose arms all score the same
    teaches nothing); a step that finds fewer is filled up with tied ones. Seeds follow (seed, step, position),
    so a resumed run samples what the killed one would have."""
    Q, G = args.questions_per_step, args.group_size
    sampled, kept = [], []
    for r in range(0, len(examples), Q):
        fresh = sample_groups(model, tok, task, examples[r:r + Q], args.seed * 1_000_003 + step * 1_009 + r, args,
                              marker)
        sampled += fresh
        kept += [g for g in fresh if not args.dynamic_sampling or len({s["reward"] for s in g["scores"]}) > 1]
        if len(kept) >= Q:
            break
    groups = (kept + [g for g in sampled if all(g is not k for k in kept)])[:Q]  # informative states first

    # P(new) in each state under the head: the advantages' weights, and the loss's states
    states = states_at_slots(model, [g["example"] for g in groups], marker)
    logit = iter(_logits(model.decision_head, states))
    logp_new = [torch.tensor(0.0) if st is None else torch.nn.functional.logsigmoid(torch.tensor(next(logit)))
                for st in states]
    arms, rewards = torch.cat([g["arms"] for g in groups]), torch.cat([g["rewards"] for g in groups])
    new = torch.stack(logp_new).exp().repeat_interleave(G)  # [Q * G]
    adv = all_arms_advantage(rewards, arms, torch.where(arms == 0, new, 1 - new).log(), G, not args.no_adv_scale)

    loss = head_loss(model.decision_head, states, [g["arms"] for g in groups], list(adv.view(-1, G)))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([model.decision_head.w], args.grad_clip).item()
    opt.step()
    opt.zero_grad(set_to_none=True)

    scores = [s for g in groups for s in g["scores"]]
    every = torch.cat([g["rewards"] for g in sampled])
    return {**mean_scores(scores), "reward_se": standard_error([sum(s["reward"] for s in g["scores"]) / G for g in groups]),
            "zero_std_groups": zero_std_group_fraction(rewards, G), "sampled_groups": len(sampled),
            "sampled_zero_std_groups": zero_std_group_fraction(every, G),
            "response_len": sum(n for g in groups for n in g["lengths"]) / (len(groups) * G),
            "arm_p_new": new[arms == 1].mean().nan_to_num(1.0).item(),  # P(new) where a memory was shown
            "loss": loss.item(), "grad_norm": grad_norm, "head_w_norm": model.decision_head.w.norm().item()}


def attach(model, ckpt: Path | None, examples: list, marker: int) -> None:
    """train.py --decision-head: the checkpoint's head, or a new one (w = 0) whose normaliser is fit on the first
    FIT_STATES of `examples` (a shuffle of the training states) that show a memory; then only w trains."""
    if ckpt is not None:
        try:
            found = load_head(model, ckpt)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            raise SystemExit(f"--resume: {Path(ckpt) / FILE} is damaged ({str(e).splitlines()[0][:300]}); nothing was "
                             f"changed: delete {ckpt} to start afresh, or pass another --out") from None
        if not found:
            raise SystemExit(f"--resume: no {Path(ckpt) / FILE} (the run was not started with --decision-head): "
                             f"delete {ckpt} to start afresh, or pass another --out")
    else:
        slots = [s for s in (slot(ex.prompt, ex.guide, marker) for ex in examples[:4 * FIT_STATES]) if s][:FIT_STATES]
        _, h = slot_states(model, slots)
        model.decision_head = DecisionHead(h.shape[1]).to(model.lm_head.weight.device)
        model.decision_head.fit(h.to(model.lm_head.weight.device))
    model.requires_grad_(False)
    model.decision_head.w.requires_grad_(True)
