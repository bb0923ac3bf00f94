"""PPO's pieces beyond the clipped surrogate (which grpo.py holds): the critic, the per-token reward with
its KL penalty, GAE, and the clipped value loss (docs/method.md section 5; names as in verl's core_algos).

Shapes: B sequences, T response tokens, right-padded; `mask` [B, T] is 1 on generated tokens.

    rewards = compute_token_rewards(scores, logp, ref_logp, mask, beta)      # [B, T]
    adv, ret = compute_gae_advantage_return(rewards, values, mask)          # [B, T] each
    actor: grpo.compute_policy_loss(logp, old_logp, adv, mask) -> grpo.agg_loss
    critic: compute_value_loss(new_values, values, ret, mask)

Read next: memory.py (the bank the agents read and write).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from losspass import tree_hidden
from parallel import concat_over_ranks


class Critic(nn.Module):
    """The value model: a model.py Transformer backbone and a scalar head on its final hidden states.

    It is a separate copy of the backbone with its own optimizer and learning rate (the paper's critic
    lr is 1e-5, the actor's 1e-6). The head starts at zero, so the first values are 0.
    """

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        p = backbone.lm_head.weight
        self.value_head = nn.Linear(backbone.cfg.dim, 1, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        if not backbone.cfg.tie_embeddings:  # values never read the LM head: no gradient, nothing to train
            backbone.lm_head.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] -> values [B, L] (float32): V at each position, predicting the return after it."""
        h = self.backbone.hidden_states(input_ids, attention_mask)  # [B, L, dim]
        return self.value_head(h).squeeze(-1).float()

    def group_values(self, prompts: list[list[int]], groups: list[list[list[int]]],
                     checkpoint: bool = True) -> list[torch.Tensor]:
        """Values of every completion of every prompt, per group [G, T], each prompt and the prompts' shared prefix
        run once (losspass.tree_hidden).

        V[:, t] is read from the state before response token t was generated (as verl does), so GAE's
        delta_t = r_t + gamma V_{t+1} - V_t compares the states around token t. 0 on padding.
        """
        h, _, mask = tree_hidden(self.backbone, prompts, groups, checkpoint)  # [M, T, dim]
        values = self.value_head(h).squeeze(-1).float() * mask
        out, row = [], 0
        for g in groups:
            out.append(values[row:row + len(g), :max(map(len, g))])
            row += len(g)
        return out


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last masked-in token, [B] (rows with no token give 0)."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def compute_token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor | None,
                          mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards, docs/method.md section 5: -beta * (logp - ref_logp) on every response token, plus
    the task score on the last response token. scores [B]; the rest [B, T]; returns [B, T] (0 on padding)."""
    m = mask.float()
    rewards = torch.zeros_like(m)
    if beta > 0:
        rewards = -beta * (logp - ref_logp).detach().float() * m
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows, last_token_index(mask)] += scores.float()
    return rewards


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked-in entries (unbiased variance, as verl)."""
    m = mask.float()
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def compute_gae_advantage_return(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                 gamma: float = 1.0, lam: float = 1.0,
                                 whiten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, docs/method.md section 5, from t = T-1 down to 0:

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},   R_t = A_t + V_t

    with V and A after the last response token taken as 0 (the episode ends there). Returns
    (advantages [B, T], whitened over the mask when `whiten`; returns [B, T], taken before whitening).
    """
    m = mask.float()
    r, v = token_rewards.float() * m, values.float() * m
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(B, device=r.device)
    next_adv = torch.zeros(B, device=r.device)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
        next_value, next_adv = v[:, t], adv[:, t]  # padding (m = 0) hands zeros back
    returns = (adv + v) * m
    if whiten:
        adv = masked_whiten(adv, mask)
    return adv.detach(), returns.detach()


def compute_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, docs/method.md section 5: 0.5 * token-mean(max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)).

    Returns (loss, clip fraction: the share of tokens where the clipped error is the larger one).
    """
    m = mask.float()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    err, err_clipped = (values - returns).square(), (clipped - returns).square()
    n = m.sum().clamp(min=1)
    loss = 0.5 * (torch.maximum(err, err_clipped) * m).sum() / n
    return loss, ((err_clipped > err).float() * m).sum().detach() / n


def step_advantages(groups: list, rewards: torch.Tensor, group_size: int, beta: float, gamma: float = 1.0,
                    lam: float = 1.0) -> None:
    """A training step's PPO signal, on train.py's groups (each with mask, old_logp, ref_logp, old_values [G, T]):
    the reward at each completion's last token minus beta * KL at every token, GAE over the critic's values (sets
    .returns), then the advantages whitened over the whole step's tokens, every rank's, as verl does (.advantages)."""
    G = group_size
    for k, g in enumerate(groups):
        token_rewards = compute_token_rewards(rewards[k * G:(k + 1) * G].to(g.mask.device), g.old_logp, g.ref_logp,
                                              g.mask, beta)
        g.advantages, g.returns = compute_gae_advantage_return(token_rewards, g.old_values, g.mask,
                                                               gamma, lam, whiten=False)
    every, start = concat_over_ranks(torch.cat([g.advantages[g.mask] for g in groups]))  # every response token
    flat = masked_whiten(every, torch.ones(len(every)))
    for g in groups:
        n = int(g.mask.sum())
        g.advantages = torch.zeros_like(g.advantages).masked_scatter(g.mask, flat[start:start + n].to(g.mask.device))
        start += n
