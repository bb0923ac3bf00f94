"""bf16 matrix products where the machine has units for them (--precision auto|float32|bf16): speed only.

Every figure this project measured until now was float32. Many CPUs multiply bf16 matrices far faster:
AMX-BF16 (Intel Sapphire Rapids and later) 4-9x, AVX512-BF16 (AMD Zen 4, this project's EPYC) 1.6-2x on
the loss pass's and the decoder's shapes (`python bench/bench_precision.py`); an AVX2-only CPU runs bf16
*slower* than float32, and GPUs have bf16 tensor cores. So the precision is chosen per machine, at run time:

    choose(flag, device)   'float32' or 'bf16': what --precision means here (auto: probe() decides)
    use(name)              set it for the models loaded afterwards
    configure(flag, dev)   both, with one probe: train.py and evaluate.py call it before loading a model
    linear(x, w, b)        what model.Linear computes when the rollout engine does not (gradients, a GPU)

What bf16 changes, and what it does not. With bf16 every product of a linear layer rounds its two inputs to
bf16, accumulates in float32 and rounds its output to bf16; the output goes on as float32. That holds in
the loss pass (forward and backward; the weight's gradient reaches the float32 master weight through the
cast) and in decoding, prefill, validation, the frozen answerer and the reference's log-probs, where the
rollout engine (engine.py) reads a bf16 copy of each weight with the same rounding points. Everything else
stays float32: master weights and AdamW's state, the residual stream, RMSNorm, RoPE, attention, and the
output layer (logits: a bf16 product would round a logit of 20 by up to 0.04 nats, as much as the PPO
clip band lets a ratio move in one step), the log-softmax, the GRPO ratio, KL and the rewards. The sampler's
and the loss pass's log-probs then differ by bf16 rounding in different summation orders (the
training-inference mismatch that vLLM + FSDP runs live with); bench/bench_precision.py measures it.

model.py and engine.py read PRODUCTS and PACK_FLOAT32; nothing else changes. Read next: cpu16.py.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import cpu16

PRODUCTS = torch.float32  # the linear layers' product dtype: float32, or torch.bfloat16 after use("bf16")
PACK_FLOAT32 = True  # engine.py: decode float32 from oneDNN's prepacked weights (False: F.linear's MKL path)
# auto takes bf16 where the probe's bf16 product is at least this much faster than float32's best: below it
# the rounding is not worth its few percent.
MIN_SPEEDUP = 1.3
CHOICES = ("auto", "float32", "bf16")


def bf16_units(device: torch.device) -> bool:
    """Whether this machine has bf16 matrix units: a GPU with bf16 support, or a CPU whose oneDNN has bf16
    kernels (AVX512-BF16 or AMX; /proc/cpuinfo's avx512_bf16, amx_bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def best_ms(fn, reps: int = 5) -> float:
    """Milliseconds of fn(), the best of `reps` calls after one to warm up."""
    fn()  # warm up (oneDNN picks and caches its kernel on the first call)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def probe(rows: int = 64, d_in: int = 576, d_out: int = 1536) -> dict:
    """Milliseconds (best of 5) of one CPU product x [rows, d_in] @ W.T, W [d_out, d_in] (SmolLM2's MLP at the
    validation batch): float32 and bf16, each through F.linear and through oneDNN's prepacked weight."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    out = {"float32": best_ms(lambda: F.linear(x, w))}
    xb, wb = x.bfloat16(), w.bfloat16()
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # else bf16 products are row by row (cpu16.py)
        out["bf16"] = best_ms(lambda: F.linear(xb, wb))
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        wp = torch.ops.mkldnn._reorder_linear_weight(w)
        out["float32_packed"] = best_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""))
        if "bf16" in out:
            wbp = torch.ops.mkldnn._reorder_linear_weight(wb)
            out["bf16_packed"] = best_ms(lambda: torch.ops.mkldnn._linear_pointwise(xb, wbp, None, "none", [], ""))
    return out


def choose(flag: str, device: torch.device | str, timings: dict | None = None) -> str:
    """'float32' or 'bf16' for --precision `flag` on `device`. auto: bf16 on a GPU with bf16 support; on a
    CPU, bf16 where it has the units and the probe's best bf16 product beats the best float32 one by
    MIN_SPEEDUP. `timings` replaces the probe (tests force both outcomes)."""
    if flag not in CHOICES:
        raise ValueError(f"--precision {flag!r}: expected one of {', '.join(CHOICES)}")
    device = torch.device(device)
    if flag != "auto":
        if flag == "bf16" and not bf16_units(device):
            print(f"--precision bf16 on a {device.type} without bf16 units: correct, but slower than float32",
                  file=sys.stderr)
        return flag
    if device.type == "cuda":
        return "bf16" if bf16_units(device) else "float32"
    if device.type != "cpu" or not bf16_units(device):
        return "float32"
    t = timings if timings is not None else probe()
    f32 = min(v for k, v in t.items() if k.startswith("float32"))
    b16 = min((v for k, v in t.items() if k.startswith("bf16")), default=float("inf"))
    return "bf16" if f32 / b16 >= MIN_SPEEDUP else "float32"


# The float32 decode kernel changes float32 rounding, so two runs of one command must not differ in it by timing
# noise: oneDNN's prepacked weights unless the probe finds F.linear (MKL) clearly faster than them.
PACK_MARGIN = 1.25


def use(name: str, timings: dict | None = None, pack: bool | None = None) -> str:
    """Set the product dtype for models loaded (packed) from now on; returns `name`. With CPU `timings`
    (probe's), the float32 decode kernel is oneDNN's prepacked one unless F.linear's is PACK_MARGIN times faster;
    `pack` (a resumed run's recorded choice) decides instead."""
    global PRODUCTS, PACK_FLOAT32
    if name not in ("float32", "bf16"):
        raise ValueError(f"precision {name!r}: expected float32 or bf16 (choose() resolves auto)")
    PRODUCTS = torch.bfloat16 if name == "bf16" else torch.float32
    if pack is not None:
        PACK_FLOAT32 = pack
    elif timings and "float32_packed" in timings:
        PACK_FLOAT32 = timings["float32_packed"] <= PACK_MARGIN * timings["float32"]
    return name


def configure(flag: str, device: torch.device | str, pack: bool | None = None) -> str:
    """choose() and use() with one probe: what train.py and evaluate.py call before loading any model. Prints
    the choice and the probe's figures (stderr); returns 'float32' or 'bf16'. `pack`: the float32 decode kernel
    a resumed run was started with (its rounding), not the probe's."""
    device = torch.device(device)
    timings = probe() if device.type == "cpu" else {}
    name = use(choose(flag, device, timings), timings, pack)
    figures = ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items())
    print(f"precision {name} (--precision {flag}{'; probe: ' + figures if figures else ''})", file=sys.stderr)
    return name


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, keep_float32: bool = False) -> torch.Tensor:
    """x @ w.T + b: a bf16 product handed on in x's dtype when PRODUCTS is bf16 and w is a float32 weight
    (not `keep_float32`, the output layer's); otherwise cpu16.linear (F.linear, or its 16-bit speed path)."""
    if PRODUCTS is torch.bfloat16 and w.dtype == torch.float32 and not keep_float32:
        bf = torch.bfloat16
        return F.linear(x.to(bf), w.to(bf), None if b is None else b.to(bf)).to(x.dtype)
    return cpu16.linear(x, w, b)
