"""GRPO's losses, one small function per equation of SPEC section 5 (names as in verl's core_algos).

Shapes: B sequences (completions), T response tokens, right-padded; `mask` [B, T] is 1 on generated,
non-padding tokens (built from lengths, never from pad ids, since pad may equal eos). Log-probs are of the
sampled tokens under logits divided by the sampling temperature.

    advantages = compute_grpo_outcome_advantage(rewards, group_size)          # [B]
    advantages, _ = project_out_choices(advantages, choices, group_size)      # optional: --hold-prior
    advantages = compute_all_arms_advantage(rewards, arms, arm_logp, group_size)  # instead: --all-arms
    hold_along(params, dL_dparams, move=0.0, lr=lr)   # optional, after backward: --hold-mean (SGD)
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages[:, None].expand_as(logp), mask, beta=0.01)

Only torch. Read next: ppo.py.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def compute_grpo_outcome_advantage(rewards: torch.Tensor, group_size: int, scale: bool = True,
                                   eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantage, SPEC 5: A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased.

    rewards [N], ordered group by group (N = groups x group_size) -> advantages [N]. scale=False gives
    Dr. GRPO's r_i - mean_g r. A group whose rewards are all equal gets A = 0 (no learning signal).
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need groups of at least 2 completions and N divisible by the group size "
                         f"(N={rewards.numel()}, group_size={group_size})")
    r = rewards.float().view(-1, group_size)  # [groups, G]
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def project_out_choices(advantages: torch.Tensor, choices: torch.Tensor, group_size: int,
                        keep: float = 0.0, expected: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Advantages with the part that a state-independent choice explains removed (for the manager's decision).

    advantages [N] (group by group), choices [N, K]: which of K decisions each completion made (one-hot, or
    counts). A decision's shared prior is a logit bias b_k added in every state; the step's gradient on it
    is sum_i A_i (1[a_i = k] - pi_k(s_i)). With X = choices centred within each group (pi_k estimated by
    the group's frequency; exact when the advantages sum to 0 in each group, as GRPO's do), that is X^T A.
    Returns A' = A - X beta with beta the least-squares fit of A on X, so X^T A' = 0: the step's push on
    every decision's shared prior sums to zero, and what is left is how the best decision depends on the
    state (which states "new" wins on, not that it wins on most). Group sums stay 0; a group whose
    completions all chose the same keeps its advantages. Also returns the share of sum(A^2) removed.
    A deliberate bias (the shared prior can then move only through the conditional part); docs/manager.md.
    keep in [0, 1] puts that share of the fit back, A' = A - (1 - keep) X beta, so X^T A' = keep X^T A: the
    prior still follows the reward, at keep times the rate (with keep = 0 nothing but drift moves it).
    expected [N, K]: the policy's own probability of each decision in the output's state, to centre on
    instead of the group's frequency (--all-arms, whose forced decisions are not the policy's samples; group
    sums then move, which the reweighted advantages allow).
    """
    G = group_size
    if choices.shape[0] != advantages.numel() or advantages.numel() % G:
        raise ValueError(f"need one row of choices per advantage and whole groups (advantages {advantages.numel()}, "
                         f"choices {tuple(choices.shape)}, group_size {G})")
    a = advantages.double()
    c = choices.double().view(-1, G, choices.shape[-1])  # [groups, G, K]
    centre = c.mean(dim=1, keepdim=True) if expected is None else expected.double().view_as(c)
    x = (c - centre).view(-1, choices.shape[-1])  # [N, K]: centred within each group, or on the policy's
    shared = x @ (torch.linalg.pinv(x, rtol=1e-6) @ a)  # [N]: A projected on the span of X (rank from float32 inputs)
    removed = (shared.square().sum() / a.square().sum()).item() if a.abs().sum() > 0 else 0.0
    return (a - (1 - keep) * shared).to(advantages.dtype), removed


def compute_all_arms_advantage(rewards: torch.Tensor, arms: torch.Tensor, arm_logp: torch.Tensor, group_size: int,
                               scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Advantages for groups whose first decision was forced in turn to each allowed choice (--all-arms).

    GRPO samples the decision from the policy, so an arm the policy has nearly given up is rarely tried, and
    a group whose samples all made one choice ties (an absorbing state: docs/manager.md). Forcing output i of
    a group to arm arms[i] (the manager: "new" or a memory, alternating; grammar.arm_guides) tries every arm in
    every state; the policy's own probability pi(a) of each arm then reweights the outputs, the importance
    weight pi(a) / (m_a / G) of an arm given to m_a of the G outputs. Per group, with w_i = pi(a_i) / m_{a_i}
    normalised to sum 1 over the arms tried:

        V   = sum_i w_i r_i                       the policy's expected reward (its baseline)
        A_i = G w_i (r_i - V) / (std_w + eps)      std_w^2 = sum_i w_i (r_i - V)^2   (scale=False: no std)

    so sum_i A_i grad log pi(a_i) / G = sum_a pi(a) (R_a - V) grad log pi(a) / std_w, the exact gradient of
    the expected reward over the decision given each arm's mean reward R_a (the "all-action" policy gradient,
    Sutton et al. 2001; Allen et al. 2017's Mean Actor-Critic), and unbiased for every later token too.
    rewards, arms (ints, equal within a group for the same arm), arm_logp (log pi(a_i) at the sampling
    temperature, no gradient) are [N], group by group -> advantages [N].
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


def hold_along(params: list[torch.Tensor], direction: list[torch.Tensor | None], move: float = 0.0,
               lr: float = 1.0) -> float:
    """Make an SGD step on params' .grad change a scalar function L(theta) by `move`, to first order (--hold-mean).

    direction = dL/dtheta (None for a parameter L does not depend on). The step theta -= lr * g changes L by
    -lr g.m to first order (m = direction), so the gradient is replaced in place by

        g' = g - (g.m / m.m) m - move / (lr m.m) m          g'.m = -move / lr

    move = 0 holds L (the manager: the mean log-odds of "new" over a step's states, its shared prior, which
    project_out_choices holds only for a logit bias: through a network's shared weights the mean moves with
    whatever the states' gradients share, docs/manager.md). Plain SGD only (Adam rescales each coordinate,
    so the step would not be -lr g'). Returns g.m / |g| |m|, the cosine the projection removed.
    """
    pairs = [(p.grad, d) for p, d in zip(params, direction) if d is not None and p.grad is not None]
    if not pairs:
        raise ValueError("hold_along: no parameter has both a gradient and a direction")
    mm = sum(d.double().square().sum() for _, d in pairs)
    gm = sum((g.double() * d.double()).sum() for g, d in pairs)
    gg = sum(g.double().square().sum() for g, _ in pairs)
    if mm == 0:
        return 0.0
    coef = (gm + move / lr) / mm
    for g, d in pairs:
        g.sub_((coef * d.double()).to(g.dtype))
    return float(gm / (gg.sqrt() * mm.sqrt())) if gg > 0 else 0.0


def zero_std_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """The share of groups whose rewards are all equal: their advantages are 0 (log it every step)."""
    r = rewards.float().view(-1, group_size)
    return (r.max(dim=1).values == r.min(dim=1).values).float().mean().item()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's k1-k3).

    k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2; k3 = exp(x) - x - 1 with x = ref_logp - logp
    (SPEC 5; unbiased and >= 0). k3 is clamped at 10, as verl does, so one wild token cannot blow up a step.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        x = ref_logp - logp
        return (torch.exp(x) - x - 1).clamp(max=10.0)
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def compute_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float = 0.2,
                        clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, SPEC 5: max(-A*rho, -A*clip(rho, 1-eps_low, 1+eps_high)).

    All inputs [B, T]. Returns (per-token loss [B, T], clip fraction: the share of masked tokens where the
    clipped term is the larger one). clip_high=None uses clip_low; DAPO's "clip higher" sets it above.
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    m = mask.float()
    clip_frac = ((clipped > unclipped).float() * m).sum() / m.sum().clamp(min=1)
    return loss, clip_frac.detach()


def agg_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
             denom: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar (SPEC 5, Aggregation).

    token-mean              sum(m*l) / sum(m)                      (default; every token weighs the same)
    seq-mean-token-mean     mean_i( sum_t m*l / sum_t m )          (original GRPO; favours short answers)
    seq-mean-token-sum      mean_i( sum_t m*l )
    seq-mean-token-sum-norm sum(m*l) / (B * T)                     (Dr. GRPO: a constant normaliser)
    denom replaces the batch's own denominator (token count, sequence count, or B*T): under gradient
    accumulation pass the whole optimizer step's count, so every micro-batch is scaled the same.
    """
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * m).sum() / (denom if denom is not None else m.sum().clamp(min=1))
    if mode == "seq-mean-token-mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / (denom if denom is not None else per_token.shape[0])
    if mode == "seq-mean-token-sum":
        return (per_token * m).sum() / (denom if denom is not None else per_token.shape[0])
    if mode == "seq-mean-token-sum-norm":
        return (per_token * m).sum() / (denom if denom is not None else per_token.numel())
    raise ValueError(f"unknown aggregation {mode!r} (choose from {', '.join(AGG_MODES)})")


def agg_denominator(mode: str, masks: list[torch.Tensor], max_new_tokens: int) -> float:
    """The whole minibatch's normaliser, so that per-group losses add up to the minibatch's (SPEC 5)."""
    if mode == "token-mean":
        return float(sum(m.sum().item() for m in masks))
    n_seqs = sum(m.shape[0] for m in masks)
    return float(n_seqs * max_new_tokens) if mode == "seq-mean-token-sum-norm" else float(n_seqs)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta: float = 0.01, clip_low: float = 0.2,
              clip_high: float | None = None, mode: str = "token-mean", denom: float | None = None):
    """The GRPO objective to minimise: agg(clipped surrogate + beta * k3 KL to the reference) (SPEC 5).

    ref_logp may be None when beta == 0 (then no reference model is needed at all).
    Returns (loss, {"clip_frac", "kl"}), kl being the token-mean k3 (0 without a reference).
    """
    per_token, clip_frac = compute_policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high)
    kl = torch.zeros((), device=logp.device)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs")
        k3 = kl_penalty(logp, ref_logp, "k3")
        per_token = per_token + beta * k3
        kl = agg_loss(k3.detach(), mask, "token-mean")
    return agg_loss(per_token, mask, mode, denom), {"clip_frac": clip_frac.item(), "kl": kl.item()}
