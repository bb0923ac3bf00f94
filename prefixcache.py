"""Prefix caching: the keys and values that several rows or calls share, computed once and read without copies.

    Segment               keys and values a block of a batch's rows starts with, held once (model.KVCache.above)
    cascade_attention     one new token per row over the shared segments and its own slots (model.Block.step)
    split_point           where a batch's shared prefix ends: after its last whole shared turn
    prefix_segment        a prefix's keys and values, kept on the model while its weights are unchanged

sampling.prefill builds a batch's segments; decision.slot_states reads the kept prefix too; the loss pass's
tree (losspass.tree_hidden) shares the prefix with gradients. Below model.py: it calls a model, never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import precision
from losspass import SHARED_PREFIX_MIN, common_prefix


@dataclass
class Segment:
    """Keys and values that a block of rows starts with, held once and read by every row of the block: prefix
    caching (vLLM, SGLang). Row r of a segment of R rows is the start of rows r*n .. r*n + n - 1 of a batch of
    B = R*n: the prompts' shared prefix (R = 1), or each distinct prompt of a batch that samples it n times."""
    k: list  # per layer [R, Hkv, S, D]
    v: list
    valid: torch.Tensor  # [R, S] bool: slots holding a real token (a left-padded prompt has empty ones)

    def rows(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """t [R, ...] as [batch, ...]: expanded (no copy) for one row, repeated for several."""
        return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t.repeat_interleave(batch // t.shape[0], 0)



def cascade_attention(q: torch.Tensor, parts: list) -> torch.Tensor:
    """One new token per row attending over shared segments and its own slots, none of them copied per row:
    cascade attention (FlashInfer). q [B, H, 1, D]; parts: (k [R, Hkv, S, D], v, valid [R, S]), the own slots last
    (R = B). Each segment's keys are read once for all n = B/R rows that start with it: the queries of those rows
    become one [n*rep, D] block against [S, D]. One softmax over the concatenated scores. -> [B, H, 1, D] float32."""
    B, H, _, D = q.shape
    Hkv = parts[-1][0].shape[1]
    rep = H // Hkv
    q = q.float().reshape(B, Hkv, rep, D) * D ** -0.5
    scores, blocks = [], []
    for k, v, valid in parts:
        R = k.shape[0]
        n = B // R
        qb = q.view(R, n, Hkv, rep, D).transpose(1, 2).reshape(R, Hkv, n * rep, D)  # the block's queries
        s = (qb @ k.float().transpose(-1, -2)).masked_fill(~valid[:, None, None, :], float("-inf"))
        scores.append(s.view(R, Hkv, n, rep, -1).transpose(1, 2).reshape(B, Hkv, rep, -1))  # [B, Hkv, rep, S]
        blocks.append((R, n, v))
    p = torch.softmax(torch.cat(scores, -1), -1)
    out, start = 0.0, 0
    for (R, n, v), s in zip(blocks, scores):
        pb = p[..., start:start + s.shape[-1]].reshape(R, n, Hkv, rep, -1).transpose(1, 2).reshape(R, Hkv, n * rep, -1)
        out = out + (pb @ v.float()).view(R, Hkv, n, rep, D).transpose(1, 2).reshape(B, Hkv, rep, D)
        start += s.shape[-1]
    return out.reshape(B, H, 1, D)


def weights_stamp(model) -> tuple:
    """What a cached prefix's keys and values depend on besides its tokens: every parameter's storage and version
    (an optimizer step bumps it), the LoRA adapters' switches, the products' precision."""
    return (tuple((p.data_ptr(), p._version) for p in model.parameters()),
            tuple(getattr(m, "lora_enabled", True) for m in model.modules()), precision.PRODUCTS, model.training)


def split_point(model, prompts: list) -> int:
    """Where the shared prefix of distinct `prompts` ends (0: none worth a segment). With a chat format
    (model.turn_ids): at the start of the last turn that begins within their common prefix - for one prompt,
    of its last user turn (its last two turn starts: the user's, then the assistant's header). So every call of an
    agent cuts its prompts after the same whole turns (the system prompt and worked examples), whatever else they
    happen to share, and prefix_segment's kept prefix serves them all, its numbers independent of the calls
    before (a resumed run computes what an unbroken one did). Without a chat format: the common prefix."""
    first, turns = prompts[0], set(getattr(model, "turn_ids", ()))
    if not turns:
        n = common_prefix(prompts) if len(prompts) > 1 else 0
    elif len(prompts) > 1:
        n = max((i for i in range(1, common_prefix(prompts) + 1) if first[i] in turns), default=0)
    else:
        starts = [i for i in range(1, len(first)) if first[i] in turns]
        n = starts[-2] if len(starts) >= 2 else 0
    return n if n >= SHARED_PREFIX_MIN else 0


@torch.no_grad()
def prefix_segment(model, ids: tuple) -> Segment:
    """The keys and values of the tokens `ids` as a one-row Segment. The model keeps the last one it computed
    (`model.prefix_kv`) and hands it out again for the same tokens while its weights are unchanged: automatic
    prefix caching with one entry, enough for an agent whose every prompt starts with its system prompt (the frozen
    reference, answerer and manager compute theirs once per process; the policy once per update)."""
    stamp, kept = weights_stamp(model), getattr(model, "prefix_kv", None)
    if kept is not None and kept[0] == tuple(ids) and kept[1] == stamp:
        return kept[2]
    cache = model.new_cache(1, len(ids))
    model(torch.tensor([list(ids)], device=model.lm_head.weight.device), cache=cache, last_only=True)
    seg = cache.segment()
    model.prefix_kv = (tuple(ids), stamp, seg)
    return seg
