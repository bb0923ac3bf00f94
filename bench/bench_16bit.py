"""Where float32 beats torch's bf16 products on this CPU (no bf16 matrix units): Linear and attention.

    python bench/bench_16bit.py         # SmolLM2-135M's shapes: MLP and lm_head weights, 1 to 64 input rows;
                                        # one query's attention over 80 and 300 cached keys, batch 1 and 8
    python bench/bench_16bit.py --smoke # the smallest setting, seconds: the test suite runs it

Sets cpu16.UPCAST_MIN_ROWS and cpu16.UPCAST_CHUNK, and why cpu16.attention_inputs gives attention float32.
The weights are streamed from memory as in decoding: each call multiplies a different copy (150 MLP-shaped
weights, 130 MB; 8 lm_heads, 450 MB), so no timing reads a weight that the cache still holds.
Prints microseconds per product, best of 4 passes, for
  bf16     F.linear on the bf16 weight (what decoding does below UPCAST_MIN_ROWS)
  whole    one float32 copy of the weight, then float32 F.linear
  chunked  cpu16.upcast_linear: UPCAST_CHUNK elements of the weight at a time (what Linear does from
           UPCAST_MIN_ROWS rows on; the same as `whole` for a weight smaller than a chunk)
and for attention (decoding: 9 query heads, 3 key/value heads of 64, as SmolLM2), bf16 SDPA vs SDPA on
float32 copies of q, k, v (what model.Block.attend does through cpu16.attention_inputs).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu16  # noqa: E402


def per_call_us(fn, weights, x, passes=4):
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, time.perf_counter() - t0)
    return best / len(weights) * 1e6


def attention_us(batch, keys, dtype, calls):
    q = torch.randn(batch, 9, 1, 64).bfloat16()
    k, v = torch.randn(batch, 3, keys, 64).bfloat16(), torch.randn(batch, 3, keys, 64).bfloat16()
    up = (lambda t: t.float()) if dtype == torch.float32 else (lambda t: t)

    def attend():
        return F.scaled_dot_product_attention(up(q), up(k), up(v), enable_gqa=True).to(torch.bfloat16)
    for _ in range(50):
        attend()
    t0 = time.perf_counter()
    for _ in range(calls):
        attend()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1536x576x150,49152x576x8", help="OUTxINxCOPIES, comma-separated")
    ap.add_argument("--rows", default="1,2,3,4,8,16,64")
    ap.add_argument("--attention-calls", type=int, default=2000, help="attention calls timed per setting")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting (tiny shapes, few calls)")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.rows, args.attention_calls = "96x32x2", "1,4", 5
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 matrix units: "
          f"{not cpu16.CPU_SLOW_16BIT_GEMM}; UPCAST_MIN_ROWS={cpu16.UPCAST_MIN_ROWS}, "
          f"UPCAST_CHUNK={cpu16.UPCAST_CHUNK}")
    print("| weight | rows | bf16 us | whole us | chunked us | best |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n_out, n_in, copies = map(int, shape.split("x"))
        weights = [torch.randn(n_out, n_in).bfloat16() for _ in range(copies)]
        with torch.no_grad():
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, n_in).bfloat16()
                t = {"bf16": per_call_us(lambda x, w: F.linear(x, w), weights, x),
                     "whole": per_call_us(lambda x, w: F.linear(x.float(), w.float()).bfloat16(), weights, x),
                     "chunked": per_call_us(lambda x, w: cpu16.upcast_linear(x, w, None), weights, x)}
                print(f"| {n_out}x{n_in} | {rows} | {t['bf16']:.0f} | {t['whole']:.0f} | {t['chunked']:.0f} | "
                      f"{min(t, key=t.get)} |", flush=True)
    print("\n| attention batch | cached keys | bf16 us | float32 us |")
    print("|---|---|---|---|")
    for batch in (1, 8):
        for keys in (80, 300):
            bf16 = attention_us(batch, keys, torch.bfloat16, args.attention_calls)
            fp32 = attention_us(batch, keys, torch.float32, args.attention_calls)
            print(f"| {batch} | {keys} | {bf16:.0f} | {fp32:.0f} |", flush=True)


if __name__ == "__main__":
    main()
