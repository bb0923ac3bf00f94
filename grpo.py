"""GRPO's losses, one small function per equation of docs/method.md section 5 (names as in verl's core_algos).

Shapes: B sequences (completions), T response tokens, right-padded; `mask` [B, T] is 1 on generated,
non-padding tokens (built from lengths, never from pad ids, since pad may equal eos). Log-probs are of the
sampled tokens under logits divided by the sampling temperature.

    advantages = compute_grpo_outcome_advantage(rewards, group_size)          # [B]
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages[:, None].expand_as(logp), mask, beta=0.01)

Only torch. Read next: ppo.py.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def compute_grpo_outcome_advantage(rewards: torch.Tensor, group_size: int, scale: bool = True,
                                   eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantage (docs/method.md 5.1): A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased.

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


def zero_std_group_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """The share of groups whose rewards are all equal: their advantages are 0 (log it every step)."""
    r = rewards.float().view(-1, group_size)
    return (r.max(dim=1).values == r.min(dim=1).values).float().mean().item()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's k1-k3).

    k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2; k3 = exp(x) - x - 1 with x = ref_logp - logp
    (docs/method.md 5.3; unbiased and >= 0). k3 is clamped at 10, as verl does, so one wild token cannot blow up a step.
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
    """PPO's clipped surrogate per token (docs/method.md 5.2): max(-A*rho, -A*clip(rho, 1-eps_low, 1+eps_high)).

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
    """Reduce a per-token loss [B, T] to a scalar (docs/method.md 5.4).

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
    """The whole minibatch's normaliser, so that per-group losses add up to the minibatch's (docs/method.md 5.4)."""
    if mode == "token-mean":
        return float(sum(m.sum().item() for m in masks))
    n_seqs = sum(m.shape[0] for m in masks)
    return float(n_seqs * max_new_tokens) if mode == "seq-mean-token-sum-norm" else float(n_seqs)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta: float = 0.01, clip_low: float = 0.2,
              clip_high: float | None = None, mode: str = "token-mean", denom: float | None = None):
    """The GRPO objective to minimise: agg(clipped surrogate + beta * k3 KL to the reference) (docs/method.md 5).

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
