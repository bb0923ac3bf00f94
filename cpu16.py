"""16-bit weights on CPUs without bf16 matrix units: speed only, safe to skip on a first read.

On an AVX2 CPU (no AVX512-BF16 or AMX) torch multiplies bf16/fp16 matrices about row by row. That is right
for one row (decoding at batch 1 is memory-bound, and 16-bit weights are half the bytes), but from 4 rows
on it is ~2x slower than upcasting the weight to float32, and ~6x from 16 rows; 16-bit attention is 1.5-5x
slower than float32 attention. bench/bench_16bit.py measures both crossovers with weights streamed from
memory, as in decoding. The upcast is exact and float32 accumulates either way: only the speed changes.

    linear(x, w, b)            F.linear, or the float32 product from an exactly upcast 16-bit weight
    attention_inputs(q, k, v)  q, k, v in float32 when 16-bit attention would be slow here

model.py calls both; nothing else in the project needs this file. Read next: engine.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_SLOW_16BIT_GEMM = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
UPCAST_MIN_ROWS = 4
# A frozen weight is upcast this many elements at a time (4 MiB of float32: stays in cache): a whole
# float32 copy of a 49k-token lm_head (113 MB) would be a fresh allocation and a trip to memory on every call.
UPCAST_CHUNK = 2**20
HALF = (torch.bfloat16, torch.float16)


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


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b, through upcast_linear for an input of UPCAST_MIN_ROWS+ rows and a 16-bit weight here."""
    if (CPU_SLOW_16BIT_GEMM and w.is_cpu and w.dtype in HALF
            and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]):
        return upcast_linear(x, w, b)
    return F.linear(x, w, b)


def attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q, k, v), in float32 when they are 16-bit on such a CPU; the caller casts the output back."""
    if CPU_SLOW_16BIT_GEMM and q.is_cpu and q.dtype in HALF:
        return q.float(), k.float(), v.float()
    return q, k, v
