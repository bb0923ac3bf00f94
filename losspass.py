"""The loss pass of GRPO and PPO: the log-probs (or hidden states) of every completion of a step's prompts, with
gradients, each prompt run once and the prompts' shared prefix (the agent's system prompt) once for them all.

model.Transformer.group_logprobs calls group_logprobs (as a method, so FSDP2 can hook it like forward:
parallel.py); ppo.Critic reads tree_hidden's states. Only the model's own parts are used (tok_emb, each Block's
`tree`, norm, lm_head, rope), so this file sits below model.py. Read next: sampling.py.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

SHARED_PREFIX_MIN = 16  # shorter common prefixes are run with each prompt (not worth a level of their own)


def common_prefix(prompts: list) -> int:
    """Tokens that every prompt starts with, leaving each at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(n):
        if any(p[i] != first[i] for p in prompts):
            return i
    return max(n, 0)


def padded(rows: list[list[int]], dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows, right-padded: (ids [N, T], real [N, T]); `real` comes from the lengths, never from pad ids."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
    real = torch.zeros(len(rows), T, dtype=torch.bool, device=dev)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device=dev)
        real[i, :len(r)] = True
    return ids, real


def own_mask(real: torch.Tensor) -> torch.Tensor:
    """[R, T, T]: each real token sees itself and the real tokens before it; a padding query sees itself (no
    empty row, so no NaN) and is masked out of everything downstream."""
    T = real.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril() & real[:, None, :]
    return causal | torch.eye(T, dtype=torch.bool, device=real.device)


def tree_hidden(model, prompts: list[list[int]], groups: list[list[list[int]]], checkpoint: bool = True):
    """Final hidden states that predict each completion token, with gradients, for every completion of every prompt
    (groups[i]: the completions of prompts[i]); the rows of the result go group by group.

    The tokens form a tree, and each runs once: the prompts' shared prefix (the system prompt: 227 of ~530 tokens
    for the cpu preset's answer prompts), then each prompt's rest, then its G completions, each level attending to
    the keys and values of the one it continues (Block.tree) - instead of N * G copies of the prompt going through
    forward and backward. The prefix's backward receives the sum of every completion's gradient, as it would
    from separate copies. With `checkpoint` (activation checkpointing), each block keeps only its inputs for the
    backward pass and recomputes the rest there: about one more forward, for a fraction of the memory.
    Returns (h [M, T, dim], tokens [M, T], mask [M, T]) with T the longest completion, right-padded; h[:, t] is
    the state before token t.
    """
    if not prompts or len(prompts) != len(groups) or any(not p for p in prompts) or \
            any(not g or any(len(c) == 0 for c in g) for g in groups):
        raise ValueError("the loss pass needs non-empty prompts, each with non-empty completions")
    dev = model.lm_head.weight.device
    S = common_prefix(prompts) if len(prompts) > 1 else 0
    S = S if S >= SHARED_PREFIX_MIN else 0
    rest_ids, rest_real = padded([p[S:] for p in prompts], dev)  # [N, R]
    tokens, mask = padded([c for g in groups for c in g], dev)  # [M, T]
    parent = torch.tensor([i for i, g in enumerate(groups) for _ in g], device=dev)  # [M]: each row's prompt
    (N, R), (M, T) = rest_ids.shape, tokens.shape
    rest_len = rest_real.sum(1)  # [N]

    xs = [model.tok_emb(rest_ids), model.tok_emb(tokens)]
    ropes = [model.rope(S + torch.arange(R, device=dev).expand(N, R)),
             model.rope(S + rest_len[parent, None] + torch.arange(T, device=dev))]
    # a completion sees the prefix, its prompt's real tokens, and its own tokens up to itself
    masks = [None if S == 0 and N == 1 else own_mask(rest_real)[:, None],
             torch.cat([rest_real[parent, None, :].expand(M, T, R), own_mask(mask)], dim=2)[:, None]]
    parents = [None, parent]
    if S:  # the prefix: a level of its own, seen whole by every prompt's rest
        masks[0] = torch.cat([torch.ones(N, 1, R, S, dtype=torch.bool, device=dev), masks[0]], dim=3)
        masks[1] = torch.cat([torch.ones(M, 1, T, S, dtype=torch.bool, device=dev), masks[1]], dim=3)
        xs = [model.tok_emb(torch.tensor([prompts[0][:S]], device=dev)), *xs]
        ropes = [model.rope(torch.arange(S, device=dev)[None]), *ropes]
        masks, parents = [None, *masks], [None, torch.zeros(N, dtype=torch.long, device=dev), parent]
    for layer in model.layers:
        if checkpoint and torch.is_grad_enabled():
            xs = torch.utils.checkpoint.checkpoint(layer.tree, xs, ropes, masks, parents, use_reentrant=False)
        else:
            xs = layer.tree(xs, ropes, masks, parents)  # Block.tree
    xr, xc = xs[-2], xs[-1]
    # position t is predicted from the hidden state before it: its prompt's last, then the completion's own
    last = xr[parent, rest_len[parent] - 1]  # [M, dim]
    h = torch.cat([last[:, None], xc[:, :-1]], dim=1)  # [M, T, dim]
    return model.norm(h), tokens, mask


def completion_hidden(model, prompt_ids: list[int], completions: list[list[int]], checkpoint: bool = True):
    """tree_hidden for the G completions of one prompt: (h [G, T, dim], tokens [G, T], mask [G, T])."""
    return tree_hidden(model, [prompt_ids], [completions], checkpoint)


def token_logprobs(model, h: torch.Tensor, tokens: torch.Tensor, temperature, allowed=None) -> torch.Tensor:
    """log softmax(lm_head(h) / temperature) at `tokens`: [M, T, dim] -> [M, T]; over `allowed` [M, T, V] only."""
    logits = model.lm_head(h).float()  # [M, T, V]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, tokens[..., None])[..., 0]


def group_logprobs(model, prompts: list[list[int]], groups: list[list[list[int]]], temperature: float = 1.0,
                   checkpoint: bool = True, allowed: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Log-probs of every completion of every prompt, with gradients: the loss pass of GRPO/PPO, one call a minibatch.

    Runs the tree of tokens once (tree_hidden). Logits are divided by the sampling temperature (docs/method.md
    section 5). `allowed`: per group, [G, T, V] bool or None: the tokens each position was sampled from (guided
    decoding's format, top-p's nucleus; grammar.allowed_masks), so that the ratio to the sampler's log-probs is 1
    before any update and a forced token has log-prob 0 and no gradient. With `checkpoint`, the [M, T, vocab]
    logits are recomputed in the backward pass instead of kept. Returns per group (logp [G, T], mask [G, T]), T
    that group's longest completion, right-padded, logp 0 on padding.
    """
    h, tokens, mask = tree_hidden(model, prompts, groups, checkpoint)
    every = None
    if allowed is not None and any(a is not None for a in allowed):
        every = torch.ones(*tokens.shape, model.lm_head.weight.shape[0], dtype=torch.bool, device=h.device)
        row = 0
        for g, a in zip(groups, allowed):  # a group without constraints allows every token
            if a is not None:
                every[row:row + len(g), :a.shape[1]] = a.to(h.device)
            row += len(g)
    if checkpoint and torch.is_grad_enabled():
        logp = torch.utils.checkpoint.checkpoint(token_logprobs, model, h, tokens, temperature, every,
                                                 use_reentrant=False)
    else:
        logp = token_logprobs(model, h, tokens, temperature, every)
    logp = logp * mask
    out, row = [], 0
    for g in groups:
        T = max(len(c) for c in g)
        out.append((logp[row:row + len(g), :T], mask[row:row + len(g), :T]))
        row += len(g)
    return out


def completion_logprobs(model, prompt_ids: list[int], completions: list[list[int]], temperature: float = 1.0,
                        checkpoint: bool = True, allowed: torch.Tensor | None = None):
    """group_logprobs for the G completions of one prompt: (logp [G, T], mask [G, T]); `allowed` [G, T, V] or None."""
    return group_logprobs(model, [prompt_ids], [completions], temperature, checkpoint,
                          None if allowed is None else [allowed])[0]
