"""Decode speed: this repository's `generate` vs transformers' `generate` on the same SmolLM2 weights.

    python bench/bench_generate.py                      # SmolLM2-135M-Instruct (GGUF), CPU, bf16 and fp32
    python bench/bench_generate.py --random-config qwen2.5-7b --device cuda --dtypes bfloat16   # on a GPU
    python bench/bench_generate.py --smoke              # the smallest setting, seconds: the test suite runs it

Sampling (temperature 1.0), 64 new tokens forced (no early stop), batch 1 and batch 8 (eight different
prompts, left-padded for transformers). Prints new tokens per second for each, best of --repeats runs,
plus the memory-bandwidth bound of batch-1 decoding (every new token reads every weight once) and the time
of the weight products alone with torch's kernels (how fast decoding could be if nothing else took time).
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import model as M  # noqa: E402
from checkpoint import hf_config  # noqa: E402
from sampling import generate  # noqa: E402

QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
             "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
             "max_position_embeddings": 32768, "eos_token_id": 151645}
RANDOM_CONFIGS = {"qwen2.5-7b": QWEN25_7B,  # --smoke: the same architecture, tiny
                  "tiny-qwen2": {**QWEN25_7B, "vocab_size": 2048, "hidden_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}}

QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Why is the sky blue? Explain briefly.", "Write a haiku about memory.",
             "What did Caroline adopt in 2023?", "Give me a synonym for happy.",
             "How many legs does a spider have?", "Translate 'good morning' into Spanish."]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    return timed_interleaved([fn], device, repeats)[0]


def timed_interleaved(fns, device, repeats):
    """Best time of each fn over `repeats` rounds that run them in turn: on a shared machine whose speed drifts
    (this one drifts by +-30% over minutes), alternating keeps the comparison fair."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def bandwidth_gbs(device):
    """Memory read bandwidth: bytes per second of summing a 512 MiB float32 tensor (each byte read once).

    float32 on purpose: a bf16 reduction on a CPU without bf16 units is limited by the conversion, not memory.
    """
    x = torch.ones(128 * 2**20, dtype=torch.float32, device=device)
    t = timed(lambda: x.sum(), device, 5)
    return x.numel() * x.element_size() / t / 1e9


def products_only_s(model, device, repeats):
    """Seconds per token of batch-1 decoding's weight products alone (every Linear once, in model order, one
    row, through model.Linear as decoding calls it): the floor of our decode step with torch's kernels."""
    layers = [m for m in model.modules() if isinstance(m, M.Linear)]
    p = model.lm_head.weight
    xs = [torch.randn(1, 1, m.in_features, dtype=p.dtype, device=device) for m in layers]

    def step():
        with torch.no_grad():
            for m, x in zip(layers, xs):
                m(x)
    return timed(step, device, 5 * repeats)


def bench_model(name: str, random_config: str | None, device, dtype):
    """(model, 8 prompts): random weights of a real model's shape with token-id prompts, or the checkpoint
    `name` with QUESTIONS as chat prompts. Packed for the rollout engine either way, as load_model packs."""
    if random_config:
        with torch.device(device):
            model = M.Transformer(M.Config.from_hf(RANDOM_CONFIGS[random_config])).to(dtype).eval()
        return engine.pack(model), [list(range(1000 + 37 * i, 1000 + 37 * i + 24 + i)) for i in range(8)]
    model, tok = M.load_model(name, dtype=dtype, device=device)
    return model, [tok.chat([{"role": "user", "content": q}]) for q in QUESTIONS]


def to_hf(ours: M.Transformer):
    """The same weights in transformers' model class (for --random-config, where no file exists)."""
    import transformers
    cfg = hf_config(ours.cfg)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg["model_type"]]
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        hf = getattr(transformers, arch)(hf_cfg)
    names = M.weight_names(ours.cfg, "hf")
    state = {names[k]: v for k, v in ours.state_dict().items() if k in names}
    hf.load_state_dict(state, strict=False, assign=True)
    dev = ours.lm_head.weight.device
    with torch.device(dev):  # its buffers were left on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)
    if hf_cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2, help="checkpoint for both implementations")
    ap.add_argument("--random-config", choices=list(RANDOM_CONFIGS), help="random weights of a real model's shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="time only this repository's generate")
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: a tiny random model, 4 tokens")
    args = ap.parse_args()
    if args.smoke:
        args.random_config, args.batches, args.new_tokens, args.repeats = "tiny-qwen2", "1,2", 4, 1
    torch.manual_seed(0)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, prompts = bench_model(args.model, args.random_config, args.device, dtype)
        hf = None
        if not args.skip_hf:  # the same dense weights in transformers' own model class
            hf = to_hf(ours)
            x = torch.tensor(prompts[:1], device=args.device)
            with torch.no_grad():
                got, want = ours(x).float(), hf(input_ids=x).logits.float()
                print(f"{dtype_name}: max |logit difference| ours vs transformers = "
                      f"{(got - want).abs().max().item():.2e}", flush=True)
                if dtype != torch.float32:  # who is closer to the float32 model?
                    exact = copy.deepcopy(ours).float()(x)
                    print(f"{dtype_name}: mean |logit - float32 logit|: ours {(got - exact).abs().mean():.3f}, "
                          f"transformers {(want - exact).abs().mean():.3f}", flush=True)
        n_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied weights count once
        bw = bandwidth_gbs(args.device)
        for B in map(int, args.batches.split(",")):
            batch = prompts[:B]

            def run_ours():
                generate(ours, batch, args.new_tokens, temperature=1.0, seed=0, stop_ids=())
            row = {"device": args.device, "dtype": dtype_name, "batch": B}
            if hf is None:
                t_ours = timed(run_ours, args.device, args.repeats)
            else:
                T = max(map(len, batch))
                ids = torch.tensor([[0] * (T - len(p)) + p for p in batch], device=args.device)
                mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=args.device)

                def run_hf():
                    with torch.no_grad():
                        hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    pad_token_id=0)
                t_ours, t_hf = timed_interleaved([run_ours, run_hf], args.device, args.repeats)
                row["hf_tok_s"] = round(B * args.new_tokens / t_hf, 1)
                row["speedup"] = round(t_hf / t_ours, 2)
            row["ours_tok_s"] = round(B * args.new_tokens / t_ours, 1)
            if B == 1:  # batch-1 decode reads all weights once per token: the bandwidth bound
                row["bandwidth_GBs"] = round(bw, 1)
                row["weights_MB"] = round(n_bytes / 1e6, 1)
                row["bound_tok_s"] = round(bw * 1e9 / n_bytes, 1)
                row["products_only_ms"] = round(1e3 * products_only_s(ours, args.device, args.repeats), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| device | dtype | batch | ours tok/s | transformers tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['dtype']} | {r['batch']} | {r['ours_tok_s']} | {r.get('hf_tok_s', '-')} | "
              f"{r.get('speedup', '-')} |")
    for r in rows:
        if "bound_tok_s" in r:
            print(f"{r['dtype']}: weights {r['weights_MB']} MB, read bandwidth {r['bandwidth_GBs']} GB/s -> "
                  f"bound {r['bound_tok_s']} tok/s at batch 1; measured {r['ours_tok_s']} "
                  f"({100 * r['ours_tok_s'] / r['bound_tok_s']:.0f}% of the bound)")
            print(f"{r['dtype']}: the weight products alone take {r['products_only_ms']} ms a token (torch's "
                  f"kernels): at most {1e3 / r['products_only_ms']:.1f} tok/s if nothing else took time"
                  + (f"; transformers' whole step takes {1e3 / r['hf_tok_s']:.1f} ms" if "hf_tok_s" in r else ""))


if __name__ == "__main__":
    main()
