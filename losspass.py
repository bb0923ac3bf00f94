"""The loss pass of GRPO and PPO: the log-probs (or hidden states) of G completions of one prompt, with
gradients, the prompt run once.

model.Transformer.logprobs calls completion_logprobs (as a method, so FSDP2 can hook it like forward:
parallel.py); ppo.Critic reads completion_hidden's states. Only the model's own parts are used
(tok_emb, each Block's `shared`, norm, lm_head, rope), so this file sits below model.py. Read next: sampling.py.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint



def completion_hidden(model, prompt_ids: list[int], completions: list[list[int]], checkpoint: bool = True):
    """Final hidden states that predict each completion token, with gradients; the prompt runs once.

    The prompt goes through the model once and the G completions attend to its keys and values, instead of
    G copies of the prompt going through forward and backward: for Memory-R1's long prompts and short
    answers that is several times fewer tokens. With `checkpoint` (activation checkpointing), each block
    keeps only its inputs for the backward pass and recomputes the rest there: about one more forward,
    for a fraction of the memory.
    Returns (h [G, T, dim], tokens [G, T], mask [G, T]) with T the longest completion, right-padded; h[:, t]
    is the state before token t; mask comes from the lengths, never from pad ids.
    """
    if not prompt_ids or not completions or any(len(c) == 0 for c in completions):
        raise ValueError("the loss pass needs a non-empty prompt and non-empty completions")
    G, T, P = len(completions), max(len(c) for c in completions), len(prompt_ids)
    dev = model.lm_head.weight.device
    tokens = torch.zeros(G, T, dtype=torch.long, device=dev)
    mask = torch.zeros(G, T, dtype=torch.bool, device=dev)
    for i, c in enumerate(completions):
        tokens[i, :len(c)] = torch.tensor(c, device=dev)
        mask[i, :len(c)] = True
    rope_p = model.rope(torch.arange(P, device=dev)[None])  # [1, 1, P, D] each
    rope_c = model.rope(P + torch.arange(T, device=dev).expand(G, T))  # [G, 1, T, D]
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril() & mask[:, None, :]  # [G, T, T]
    causal |= torch.eye(T, dtype=torch.bool, device=dev)  # a padding query sees itself: no empty rows
    mask_c = torch.cat([torch.ones(G, T, P, dtype=torch.bool, device=dev), causal], dim=2)[:, None]

    xp = model.tok_emb(torch.tensor([prompt_ids], device=dev))  # [1, P, dim]
    xc = model.tok_emb(tokens)  # [G, T, dim]
    for layer in model.layers:
        if checkpoint and torch.is_grad_enabled():
            xp, xc = torch.utils.checkpoint.checkpoint(layer.shared, xp, xc, rope_p, rope_c, mask_c,
                                                       use_reentrant=False)
        else:
            xp, xc = layer.shared(xp, xc, rope_p, rope_c, mask_c)  # Block.shared
    # position t is predicted from the hidden state before it: the prompt's last, then the completion's
    h = torch.cat([xp[:, -1:].expand(G, 1, -1), xc[:, :-1]], dim=1)  # [G, T, dim]
    return model.norm(h), tokens, mask


def token_logprobs(model, h: torch.Tensor, tokens: torch.Tensor, temperature, allowed=None) -> torch.Tensor:
    """log softmax(lm_head(h) / temperature) at `tokens`: [G, T, dim] -> [G, T]; over `allowed` [G, T, V] only."""
    logits = model.lm_head(h).float()  # [G, T, V]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None])[..., 0]


def completion_logprobs(model, prompt_ids: list[int], completions: list[list[int]], temperature: float = 1.0,
                        checkpoint: bool = True, allowed: torch.Tensor | None = None):
    """Log-probs of G completions of one prompt, with gradients: the loss pass of GRPO/PPO.

    Runs the prompt once (completion_hidden). Logits are divided by the sampling temperature (docs/method.md
    section 5). `allowed` [G, T, V] bool: the tokens each position was sampled from (guided decoding's
    format, top-p's nucleus; grammar.allowed_masks), so that the ratio to the sampler's log-probs is 1 before
    any update and a forced token has log-prob 0 and no gradient. With `checkpoint`, the [G, T, vocab]
    logits are recomputed in the backward pass instead of kept. Returns (logp [G, T], mask [G, T]),
    right-padded, logp 0 on padding.
    """
    h, tokens, mask = completion_hidden(model, prompt_ids, completions, checkpoint)
    if allowed is not None:
        allowed = allowed.to(h.device)
    if checkpoint and torch.is_grad_enabled():
        logp = torch.utils.checkpoint.checkpoint(token_logprobs, model, h, tokens, temperature, allowed,
                                                 use_reentrant=False)
    else:
        logp = token_logprobs(model, h, tokens, temperature, allowed)
    return logp * mask, mask
