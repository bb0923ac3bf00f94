"""Decoding and the RL loss pass on a model.py Transformer (re-exported by model.py as M.generate, ...).

    generate(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, seed, return_logprobs)
        batched sampling with the KV cache; identical prompts (a GRPO group) are prefilled once
    completion_logprobs(model, prompt_ids, completions, temperature, checkpoint=True)
        log-probs of G completions of one prompt, with gradients, the prompt run once, activation
        checkpointing per block
    completion_hidden(model, prompt_ids, completions)
        the hidden states behind those log-probs (the PPO critic's value head reads them too)
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (token [B], log-prob [B] of that token under the distribution it was drawn from).

    Temperature 0 is greedy and reports the model's own log-prob. Sampling divides the logits by the
    temperature first (SPEC section 5), then keeps the smallest top-p nucleus and renormalises.
    """
    logits = logits.float()
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)  # [B, V]
    if top_p < 1.0:
        sorted_logp, order = logp.sort(-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above
        sorted_logp = sorted_logp.masked_fill(mass_before >= top_p, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
        logp = torch.log_softmax(logp, -1)  # renormalise over the nucleus
    # Inverse-CDF sampling: one uniform number per row (multinomial draws one per vocabulary entry); u > 0 so
    # the first index with cdf >= u always has non-zero probability.
    cdf = logp.exp().cumsum(-1)  # [B, V]
    u = (1 - torch.rand(logp.shape[0], 1, generator=generator, device=logp.device)) * cdf[:, -1:]  # in (0, 1]
    token = torch.searchsorted(cdf, u)[:, 0].clamp(max=logp.shape[-1] - 1)
    return token, logp.gather(-1, token[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, stop_ids=None, seed: int | None = None, return_logprobs: bool = False,
             sync_steps: bool = False):
    """Sample a continuation of each prompt; returns the new tokens only, cut after the first stop id.

    stop_ids: None -> the model's (load_model sets the tokenizer's); () -> never stop early.
    seed: seeds a private generator, so the same call gives the same tokens.
    Identical prompts (G samples of one question) are prefilled once and their KV cache rows copied.
    With return_logprobs, also returns each new token's log-prob under the sampling distribution.
    sync_steps: take all max_new_tokens steps even after every row stopped (outputs are cut the same): a
    model sharded with FSDP gathers weights collectively at each step, so every rank must take as many.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    stops = torch.tensor(list(model.stop_ids if stop_ids is None else stop_ids), dtype=torch.long)
    dev = model.lm_head.weight.device
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None

    # Prefill each distinct prompt once, left-padded to a common length.
    unique = list(dict.fromkeys(tuple(p) for p in prompt_ids))
    row_of = {p: i for i, p in enumerate(unique)}
    T = max(len(p) for p in unique)
    ids = torch.zeros(len(unique), T, dtype=torch.long)
    real = torch.zeros(len(unique), T, dtype=torch.bool)
    for i, p in enumerate(unique):
        ids[i, T - len(p):] = torch.tensor(p)
        real[i, T - len(p):] = True
    cache = model.new_cache(len(unique), T + max_new_tokens)
    logits = model(ids.to(dev), real.to(dev), cache=cache, last_only=True)[:, -1]  # [U, V]
    rows = torch.tensor([row_of[tuple(p)] for p in prompt_ids], device=dev)
    if len(unique) != len(prompt_ids):
        cache.select_rows(rows)
    logits = logits[rows]  # [B, V]

    B = len(prompt_ids)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long)
    out_logp = torch.zeros(B, max_new_tokens)
    lengths = torch.full((B,), max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool)
    stops = stops.to(dev)
    for t in range(max_new_tokens):
        token, logp = sample_next(logits, temperature, top_p, generator)
        out[:, t], out_logp[:, t] = token.cpu(), logp.cpu()
        hit = torch.isin(token, stops).cpu() & ~done
        lengths[hit] = t + 1
        done |= hit
        if (bool(done.all()) and not sync_steps) or t == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache)[:, -1]
    tokens = [out[b, :lengths[b]].tolist() for b in range(B)]
    if return_logprobs:
        return tokens, [out_logp[b, :lengths[b]].tolist() for b in range(B)]
    return tokens


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
    from model import rope_cos_sin

    G, T, P = len(completions), max(len(c) for c in completions), len(prompt_ids)
    dev = model.lm_head.weight.device
    tokens = torch.zeros(G, T, dtype=torch.long, device=dev)
    mask = torch.zeros(G, T, dtype=torch.bool, device=dev)
    for i, c in enumerate(completions):
        tokens[i, :len(c)] = torch.tensor(c, device=dev)
        mask[i, :len(c)] = True
    rope_p = rope_cos_sin(model.inv_freq, torch.arange(P, device=dev)[None])  # [1, 1, P, D] each
    rope_c = rope_cos_sin(model.inv_freq, P + torch.arange(T, device=dev).expand(G, T))  # [G, 1, T, D]
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
            xp, xc = layer.shared(xp, xc, rope_p, rope_c, mask_c)  # model.Block.shared
    # position t is predicted from the hidden state before it: the prompt's last, then the completion's
    h = torch.cat([xp[:, -1:].expand(G, 1, -1), xc[:, :-1]], dim=1)  # [G, T, dim]
    return model.norm(h), tokens, mask


def token_logprobs(model, h: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(lm_head(h) / temperature) at `tokens`: [G, T, dim] -> [G, T]."""
    logp = torch.log_softmax(model.lm_head(h).float() / temperature, dim=-1)  # [G, T, V]
    return logp.gather(-1, tokens[..., None])[..., 0]


def completion_logprobs(model, prompt_ids: list[int], completions: list[list[int]],
                        temperature: float = 1.0, checkpoint: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of G completions of one prompt, with gradients: the loss pass of GRPO/PPO.

    Runs the prompt once (completion_hidden). Logits are divided by the sampling temperature (SPEC
    section 5). With `checkpoint`, the [G, T, vocab] logits are recomputed in the backward pass instead of
    kept. Returns (logp [G, T], mask [G, T]), right-padded, logp 0 on padding.
    """
    h, tokens, mask = completion_hidden(model, prompt_ids, completions, checkpoint)
    if checkpoint and torch.is_grad_enabled():
        logp = torch.utils.checkpoint.checkpoint(token_logprobs, model, h, tokens, temperature, use_reentrant=False)
    else:
        logp = token_logprobs(model, h, tokens, temperature)
    return logp * mask, mask
