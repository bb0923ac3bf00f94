"""The rollout engine (engine.py): decoding from prepacked weights against torch's F.linear, in one run.

    python bench/bench_engine.py                      # every part, SmolLM2-135M-Instruct, float32, this CPU
    python bench/bench_engine.py --parts steps,hf     # some parts
    python bench/bench_engine.py --random-config qwen2.5-7b --device cuda --dtype bfloat16 --parts steps,hf
    python bench/bench_engine.py --smoke              # the smallest setting (the test suite runs it)

Parts ("before" = every linear layer through F.linear, engine.unpack; "after" = the engine's copies):
  steps    one decode step (model.decode_step, a 300-token prompt cached) at each --batches size, median of
           --steps steps: weight bytes streamed per second, as a share of this machine's read bandwidth
           (summing a 512 MiB float32 tensor, the same run), and GFLOP/s of the step as a share of a large
           product's; tokens per second per batch (the curve behind the batch defaults). On a GPU "after"
           is the step replayed from a CUDA graph (sampling.CudaGraphStep), with --compile also compiled.
  compile  the compiled decode step (model.compile_decode; on a GPU also replayed from a CUDA graph): seconds
           to compile, step time after
  llama    llama.cpp on the same GGUF at batch 1, 64 tokens, against our generate (needs llama-cpp-python)
  hf       generate at --hf-batch prompts, 64 new tokens forced, against transformers' generate on the same
           weights (alternating rounds, best of --repeats each)
  grpo     the sampling of one GRPO step of the cpu preset (train.rollout's generate call: 4 gym training
           prompts x G = 8, guided, temperature 0.5, 16 tokens), before (F.linear, every prompt prefilled
           whole: the code before the engine) and after (the engine, the shared prefix prefilled once)
  eval     evaluate.py on the gym's first test conversation (k 5, 16 tokens, plain prompt, add-all banks), as
           a user runs it (loading and banks included): before as above with --batch 8 (the old default),
           after with the engine and evaluate.py's default batch
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import prefixcache  # noqa: E402
import sampling  # noqa: E402
import model as M  # noqa: E402
from bench_generate import RANDOM_CONFIGS, bandwidth_gbs, bench_model, sync, timed_interleaved, to_hf  # noqa: E402
from sampling import CudaGraphStep, generate  # noqa: E402

PROMPT_LEN = 300  # tokens in the cache when a decode step is timed (an Answer Agent prompt of the cpu preset)


def peak_gflops(device, dtype) -> float:
    """GFLOP/s of a large product (2048 rows x 2304 x 2304) through the fastest path here: the compute roof
    that decode steps at large batches run into."""
    layer = engine.pack(M.Linear(2304, 2304, bias=False).to(device, dtype))
    x = torch.randn(2048, 2304, device=device, dtype=dtype)
    with torch.no_grad():
        t = timed_interleaved([lambda: layer(x)], device, 5)[0]
    return 2 * x.shape[0] * layer.weight.numel() / t / 1e9


def step_seconds(model, batch: int, steps: int, step=None) -> float:
    """Median seconds of one decode step at `batch` rows after a PROMPT_LEN-token prefill."""
    dev = model.lm_head.weight.device
    cache = model.new_cache(batch, PROMPT_LEN + steps + 4)
    token = torch.zeros(batch, dtype=torch.long, device=dev)
    with torch.no_grad():
        model(torch.randint(0, model.cfg.vocab_size, (batch, PROMPT_LEN), device=dev), cache=cache, last_only=True)
        graph = step(model, cache) if step else None
        times = []
        for _ in range(steps):
            sync(dev)
            t0 = time.perf_counter()
            model.decode_step(token, cache, graph)
            sync(dev)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def pieces_ms(model, batch: int, steps: int) -> tuple[float, float]:
    """Milliseconds per decode step of (the products alone: every linear layer once on `batch` rows, back to
    back, through model.Linear; the attention alone: every layer's one query per row over PROMPT_LEN keys)."""
    dev, cfg = model.lm_head.weight.device, model.cfg
    dtype = model.lm_head.weight.dtype
    layers = engine.layers_of(model)
    xs = [torch.randn(batch, 1, m.in_features, device=dev, dtype=dtype) for m in layers]
    q = torch.randn(batch, cfg.n_heads, 1, cfg.head_dim, device=dev, dtype=dtype)
    kv = torch.randn(batch, cfg.n_kv_heads, PROMPT_LEN, cfg.head_dim, device=dev, dtype=dtype)

    def products():
        for m, x in zip(layers, xs):
            m(x)

    def attention():
        for _ in range(cfg.n_layers):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
    with torch.no_grad():
        t = timed_interleaved([products, attention], dev, max(3, steps // 2))
    return 1e3 * t[0], 1e3 * t[1]


def prefill_seconds(model, prompts: int, length: int) -> float:
    """Seconds to prefill `prompts` distinct prompts of `length` tokens (best of 2): the prompt side of a
    rollout or an evaluation batch, compute-bound."""
    dev = model.lm_head.weight.device
    ids = torch.randint(0, model.cfg.vocab_size, (prompts, length), device=dev)
    with torch.no_grad():
        return timed_interleaved([lambda: model(ids, cache=model.new_cache(prompts, length), last_only=True)],
                                 dev, 2)[0]


def part_steps(model, args, rows):
    dev = model.lm_head.weight.device
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once
    n_flops = 2 * sum(m.weight.numel() for m in engine.layers_of(model))  # per token, the products
    bw, roof = bandwidth_gbs(dev), peak_gflops(dev, model.lm_head.weight.dtype)
    print(f"weights {n_bytes / 1e6:.0f} MB; read bandwidth {bw:.1f} GB/s; a large product {roof:.0f} GFLOP/s")
    gpu = dev.type == "cuda"
    for B in args.batches:
        engine.unpack(model)
        before = step_seconds(model, B, args.steps)
        if gpu:
            after = step_seconds(model, B, args.steps, step=CudaGraphStep)
        else:
            engine.pack(model)
            after = step_seconds(model, B, args.steps)
        for name, t in (("F.linear" if not gpu else "eager", before), ("engine" if not gpu else "CUDA graph", after)):
            rows.append({"part": "steps", "batch": B, "path": name, "step_ms": round(1e3 * t, 2),
                         "tok_s": round(B / t, 1), "weight_GBs": round(n_bytes / t / 1e9, 2),
                         "bw_share": round(n_bytes / t / 1e9 / bw, 3),
                         "gflops_share": round(B * n_flops / t / 1e9 / roof, 3)})
            print(json.dumps(rows[-1]), flush=True)
        products, attention = pieces_ms(model, B, args.steps)
        rows[-1].update(products_ms=round(products, 2), attention_ms=round(attention, 2))
        print(f"batch {B}: {before / after:.2f}x; {rows[-1]['path']}: products alone {products:.1f} ms "
              f"({B * n_flops / products / 1e6:.0f} GFLOP/s, {n_bytes / products / 1e6:.1f} GB/s), attention alone "
              f"over {PROMPT_LEN} keys {attention:.1f} ms", flush=True)
    if not gpu:  # the prompt side: a GRPO step's 4 prompts of ~570 tokens
        n, length = (2, 8) if args.smoke else (4, 570)
        engine.unpack(model)
        before = prefill_seconds(model, n, length)
        engine.pack(model)
        after = prefill_seconds(model, n, length)
        flops = 2 * n * length * (sum(m.weight.numel() for m in engine.layers_of(model)) - model.lm_head.weight.numel())
        print(f"prefill of {n} prompts x {length} tokens: F.linear {before:.2f} s ({flops / before / 1e9:.0f} GFLOP/s "
              f"in the products), engine {after:.2f} s ({flops / after / 1e9:.0f} GFLOP/s)", flush=True)
    engine.pack(model)


def part_compile(model, args, rows, prompts):
    graph = CudaGraphStep if model.lm_head.weight.is_cuda else None  # on a GPU: compiled, then captured
    t0 = time.perf_counter()
    M.compile_decode(model)
    step_seconds(model, args.batches[0], 2, graph)  # the first call compiles
    compile_s = time.perf_counter() - t0
    for B in args.batches:
        t0 = time.perf_counter()
        t = step_seconds(model, B, args.steps, graph)
        rows.append({"part": "compile", "batch": B, "compile_s": round(compile_s, 1), "step_ms": round(1e3 * t, 2),
                     "first_call_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if graph:  # generate with the compiled step, replayed from CUDA graphs, as part hf runs it
        batch = (prompts * args.hf_batch)[:args.hf_batch]
        compiled = generate(model, batch, 16, temperature=0, stop_ids=())
        step_fn, model.step_fn = model.step_fn, None
        eager = generate(model, batch, 16, temperature=0, stop_ids=(), cuda_graph=False)
        model.step_fn = step_fn
        same = sum(a == b for a, b in zip(compiled, eager))
        print(f"greedy tokens, compiled step in a CUDA graph vs eager step: {same} of {len(batch)} rows equal over "
              "16 tokens", flush=True)
        t = timed_interleaved([lambda: generate(model, batch, args.new_tokens, temperature=1.0, seed=0,
                                                stop_ids=())], model.lm_head.weight.device, args.repeats)[0]
        print(f"generate at batch {len(batch)}, compiled step in a CUDA graph: "
              f"{len(batch) * args.new_tokens / t:.1f} tok/s", flush=True)
    model.step_fn = None


def part_hf(model, args, rows, prompts):
    dev = model.lm_head.weight.device
    hf = to_hf(model)
    batch = (prompts * args.hf_batch)[:args.hf_batch]
    T = max(map(len, batch))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in batch], device=dev)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=dev)
    graph = dev.type == "cuda"

    def ours():
        generate(model, batch, args.new_tokens, temperature=1.0, seed=0, stop_ids=(), cuda_graph=graph)

    def theirs():
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
    if graph:  # the graph must replay exactly the eager step: the same greedy tokens
        same = generate(model, batch, 16, temperature=0, stop_ids=(), cuda_graph=False) == \
            generate(model, batch, 16, temperature=0, stop_ids=(), cuda_graph=True)
        print(f"greedy tokens, CUDA graph vs eager decode step, {len(batch)} rows x 16: equal {same}", flush=True)
    t_ours, t_hf = timed_interleaved([ours, theirs], dev, args.repeats)
    n = len(batch) * args.new_tokens
    rows.append({"part": "hf", "batch": len(batch), "ours_tok_s": round(n / t_ours, 1),
                 "transformers_tok_s": round(n / t_hf, 1), "speedup": round(t_hf / t_ours, 2)})
    print(json.dumps(rows[-1]), flush=True)


def part_llama(model, args, rows, prompts):
    """llama.cpp (llama-cpp-python, a benchmark-only dependency) on the same GGUF file at batch 1: what CPU users
    run instead. It multiplies the file's 4-bit blocks directly; we decode from their float32 dequantisation."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python); skipped")
        return
    from gguf_loader import resolve_alias
    path = Path(resolve_alias(str(args.model)))
    if path.suffix != ".gguf":
        print(f"llama.cpp: {path} is not a GGUF file; skipped")
        return
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)

    def theirs():
        for n, _ in enumerate(llm.generate(prompts[2], temp=1.0, top_k=0, top_p=1.0, reset=True), 1):
            if n == args.new_tokens:
                break

    def ours():
        generate(model, prompts[2:3], args.new_tokens, temperature=1.0, seed=0, stop_ids=())
    t_ours, t_llama = timed_interleaved([ours, theirs], "cpu", args.repeats)
    rows.append({"part": "llama", "ours_tok_s": round(args.new_tokens / t_ours, 1),
                 "llama_cpp_tok_s": round(args.new_tokens / t_llama, 1),
                 "gguf_MB": round(path.stat().st_size / 1e6, 1)})
    print(json.dumps(rows[-1]), flush=True)


def with_engine(on: bool, fn):
    """Run fn as the code runs now (on), or as it ran before the engine (off): load_model packs nothing and
    prefill runs every prompt whole (no shared prefix). For the parts that load their own models."""
    saved = engine.CPU_FAST_LAYOUT, prefixcache.SHARED_PREFIX_MIN
    engine.CPU_FAST_LAYOUT = on and saved[0]
    prefixcache.SHARED_PREFIX_MIN = saved[1] if on else float("inf")
    try:
        return fn()
    finally:
        engine.CPU_FAST_LAYOUT, prefixcache.SHARED_PREFIX_MIN = saved


def part_grpo(args, rows):
    import agents
    import train
    flags = ["--model", str(args.model), "--out", "unused", "--preset", "cpu"]
    targs = train.parse_args(flags + (["--max-new-tokens", "2"] if args.smoke else []))
    base, tok = M.load_model(targs.model)
    task = agents.answer_task(targs, tok, base)
    chunk = task.train[:targs.questions_per_step]
    G = targs.group_size

    def sample():
        policy = M.load_model(targs.model)[0]
        t0 = time.perf_counter()
        generate(policy, [ex.prompt for ex in chunk for _ in range(G)], targs.max_new_tokens, targs.temperature,
                 targs.top_p, seed=1, return_logprobs=True, guide=[ex.guide for ex in chunk for _ in range(G)],
                 return_supports=True)
        return time.perf_counter() - t0
    sample()  # warm the guide's mask cache, so neither side pays for it
    best = {"before": float("inf"), "after": float("inf")}
    for _ in range(args.repeats):
        best["before"] = min(best["before"], with_engine(False, sample))
        best["after"] = min(best["after"], with_engine(True, sample))
    rows.append({"part": "grpo", "rows": len(chunk) * G, "before_s": round(best["before"], 2),
                 "after_s": round(best["after"], 2), "speedup": round(best["before"] / best["after"], 2)})
    print(json.dumps(rows[-1]), flush=True)


def part_eval(args, rows):
    import evaluate
    from data import gym
    n = sum(q.conv_id == gym.load_conversations(splits=("test",))[0].sample_id for q in gym.load_split("test"))
    n = 2 if args.smoke else n
    common = ["--data", "gym", "--split", "test", "--limit", str(n), "--k", "5", "--no-distill",
              "--max-new-tokens", "2" if args.smoke else "16", "--model", str(args.model)]

    def run(batch):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            evaluate.main(common + (["--batch", str(batch)] if batch else []) + ["--out", out])
            return time.perf_counter() - t0
    before = with_engine(False, lambda: run(8))
    after = with_engine(True, lambda: run(None))
    rows.append({"part": "eval", "questions": n, "before_s": round(before, 1), "after_s": round(after, 1),
                 "speedup": round(before / after, 2)})
    print(json.dumps(rows[-1]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2, help="checkpoint (every part but --random-config's)")
    ap.add_argument("--random-config", choices=list(RANDOM_CONFIGS), help="random weights of a real model's shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--parts", default="steps,hf,llama,compile,grpo,eval")
    ap.add_argument("--batches", default="1,8,16,32,64", help="decode-step batch sizes")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per batch size (median)")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model, 2 steps, batches 1 and 2")
    args = ap.parse_args()
    if args.smoke:
        args.random_config = args.random_config or ("tiny-qwen2" if args.model == M.OFFLINE_SMOLLM2 else None)
        args.batches, args.steps, args.new_tokens, args.repeats, args.hf_batch = "1,2", 2, 4, 1, 2
        args.parts = args.parts.replace("compile,", "")  # tests/test_engine.py compiles a decode step
    args.batches = [int(b) for b in args.batches.split(",")]
    parts = args.parts.split(",")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, prompts = bench_model(args.model, args.random_config, args.device, dtype)
    print(f"{args.device}, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    rows = []
    if "steps" in parts:
        part_steps(model, args, rows)
    if "hf" in parts:
        part_hf(model, args, rows, prompts)
    if "llama" in parts and not args.random_config and args.device == "cpu":
        part_llama(model, args, rows, prompts)
    if "compile" in parts:
        part_compile(model, args, rows, prompts)
    if "grpo" in parts and not args.random_config:
        part_grpo(args, rows)
    if "eval" in parts and not args.random_config:
        part_eval(args, rows)
    print("\n| batch | path | ms per step | tok/s | weight GB/s | of read bandwidth | of a large product's FLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if r["part"] == "steps"):
        print(f"| {r['batch']} | {r['path']} | {r['step_ms']} | {r['tok_s']} | {r['weight_GBs']} | "
              f"{100 * r['bw_share']:.0f}% | {100 * r['gflops_share']:.0f}% |")
    for r in rows:
        if r["part"] == "compile":
            print(f"compiled decode step, batch {r['batch']}: {r['step_ms']} ms (compiling took {r['compile_s']} s; "
                  f"this batch's first call {r['first_call_s']} s)")
        if r["part"] == "hf":
            print(f"generate at batch {r['batch']}: ours {r['ours_tok_s']} tok/s, transformers "
                  f"{r['transformers_tok_s']} tok/s: {r['speedup']}x")
        if r["part"] == "llama":
            print(f"batch 1, 64 tokens: llama.cpp on the {r['gguf_MB']} MB GGUF {r['llama_cpp_tok_s']} tok/s, ours "
                  f"(float32 from it) {r['ours_tok_s']} tok/s")
        if r["part"] in ("grpo", "eval"):
            what = "sampling of one GRPO step" if r["part"] == "grpo" else f"one test conversation ({r['questions']} q)"
            print(f"{what}: before {r['before_s']} s, after {r['after_s']} s: {r['speedup']}x")


if __name__ == "__main__":
    main()
