"""float32 against bf16 products (precision.py) on this machine, in one run: what --precision auto decides on.

    python bench/bench_precision.py                  # SmolLM2-135M-Instruct, this CPU, 2 threads
    python bench/bench_precision.py --smoke --model CKPT     # the smallest setting (the test suite runs it)

Prints the CPU, then four tables, float32 and bf16 side by side, best of --repeats:
  products   F.linear and oneDNN's prepacked product (engine.py) at the shapes the runs use: a loss pass
             (8 completions + a prompt: 5600 rows; SmolLM2's MLP both ways), a decode step at 64 and 1 rows
  model      one decode step at 1 / 16 / 64 rows (a 600-token cache), a prefill of 8 x 600 tokens, and the
             GRPO loss pass (forward + backward of 8 completions of 16 tokens after a 600-token prompt:
             the main command's shape): the model's own code, in each precision (engine copies re-packed)
  mismatch   the training-inference mismatch: G completions sampled (temperature 0.5, as the main command)
             and their sampling-time log-probs against the loss pass's, per token: mean and max |delta|, and
             the spread of the PPO ratio exp(delta) at the first update
  gradient   does bf16 change the update? The GRPO policy-gradient of one group (G completions sampled in
             float32, fixed advantages +1, -1, +1, ...) in float32 and in bf16: the cosine of the two and
             the relative size of their difference, against the same between two groups' float32
             gradients (the sampling noise GRPO lives with)
  probe      what precision.probe measures and what auto picks here
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import losspass  # noqa: E402
import model as M  # noqa: E402
import precision  # noqa: E402
from precision import best_ms  # noqa: E402
from sampling import generate  # noqa: E402


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(units) or 'no AVX'})"


def products(shapes, repeats: int) -> None:
    print("| rows x in x out | float32 F.linear | float32 packed | bf16 F.linear | bf16 packed | best f32 / best bf16 |")
    print("|---|---|---|---|---|---|")
    for rows, d_in, d_out in shapes:
        x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
        xb, wb = x.bfloat16(), w.bfloat16()
        wp = torch.ops.mkldnn._reorder_linear_weight(w)
        r = [best_ms(lambda: F.linear(x, w), repeats),
             best_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], ""), repeats),
             best_ms(lambda: F.linear(xb, wb), repeats)]
        if engine.CPU_BF16_LAYOUT:  # oneDNN packs bf16 only where it has bf16 kernels
            wbp = torch.ops.mkldnn._reorder_linear_weight(wb)
            r.append(best_ms(lambda: torch.ops.mkldnn._linear_pointwise(xb, wbp, None, "none", [], ""), repeats))
        cells = [f"{v:.3f} ms" for v in r] + ["-"] * (4 - len(r))
        print(f"| {rows} x {d_in} x {d_out} | " + " | ".join(cells) + f" | {min(r[:2]) / min(r[2:]):.2f}x |",
              flush=True)


def set_precision(net, name: str) -> None:
    precision.use(name)
    engine.pack(net)  # the engine's copies in the new dtype (the output layer's stay float32)


def model_parts(net, prompt_len: int, batches, group: int, answer_len: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    top = min(40000, net.cfg.vocab_size)
    prompt = torch.randint(100, top, (prompt_len,), generator=g).tolist()
    answers = [torch.randint(100, top, (answer_len,), generator=g).tolist() for _ in range(group)]

    def decode(batch):
        cache = net.new_cache(batch, prompt_len + repeats + 8)
        with torch.no_grad():
            net(torch.tensor([prompt] * batch), cache=cache)
        token = torch.zeros(batch, dtype=torch.long)

        def step():
            with torch.no_grad():
                net.decode_step(token, cache)
            if cache.len >= cache.valid.shape[1] - 1:
                cache.len = prompt_len  # reuse the tail slots: the step's cost depends on the cache size only
        return step

    def prefill():
        with torch.no_grad():
            net(torch.tensor([prompt] * group), cache=net.new_cache(group, prompt_len))

    def loss_pass():
        net.zero_grad(set_to_none=True)
        logp, mask = losspass.completion_logprobs(net, prompt, answers)
        logp.sum().backward()

    parts = [(f"decode step, {b} rows, {prompt_len}-token cache", decode, b) for b in batches]
    parts += [(f"prefill {group} x {prompt_len} tokens", None, prefill),
              (f"loss pass {group} x ({prompt_len} + {answer_len}), forward + backward", None, loss_pass)]
    print("\n| model part | float32 | bf16 | speed-up |")
    print("|---|---|---|---|")
    for name, make, arg in parts:
        ms = []
        for p in ("float32", "bf16"):
            set_precision(net, p)
            fn = make(arg) if make else arg
            ms.append(best_ms(fn, repeats))
        print(f"| {name} | {ms[0]:.1f} ms | {ms[1]:.1f} ms | {ms[0] / ms[1]:.2f}x |", flush=True)


def mismatch(net, tok, group: int, max_new: int) -> None:
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in (
        "Caroline adopted a dog named Buddy in May. What did Caroline adopt?",
        "Name three colours and say which one you like best.")]
    print("\n| precision | tokens | mean abs delta log-prob | max abs delta | ratio exp(delta): min .. max |")
    print("|---|---|---|---|---|")
    for p in ("float32", "bf16"):
        set_precision(net, p)
        deltas = []
        for i, prompt in enumerate(prompts):
            comps, lps = generate(net, [prompt] * group, max_new, temperature=0.5, seed=i, return_logprobs=True)
            want, mask = losspass.completion_logprobs(net, prompt, comps, temperature=0.5)  # with gradients: the
            want = want.detach()  # loss pass's own products (precision.linear), not the engine's copies
            old = torch.zeros_like(want)
            for r, lp in enumerate(lps):
                old[r, :len(lp)] = torch.tensor(lp)
            deltas.append((want - old)[mask])
        d = torch.cat(deltas).double()
        print(f"| {p} | {len(d)} | {d.abs().mean():.2e} | {d.abs().max():.2e} | "
              f"{d.exp().min():.4f} .. {d.exp().max():.4f} |", flush=True)


def group_gradient(net, prompt, comps) -> torch.Tensor:
    """The flattened gradient of a GRPO loss on one group: -sum(A_i * log p(token)) / tokens, with the fixed
    advantages +1, -1, +1, ... (a reward that ranks the samples; which one does not matter for the comparison)."""
    adv = torch.tensor([(-1.0) ** i for i in range(len(comps))])
    net.zero_grad(set_to_none=True)
    logp, mask = losspass.completion_logprobs(net, prompt, comps, temperature=0.5)
    (-(adv[:, None] * logp * mask).sum() / mask.sum()).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]).double()


def gradient(net, tok, group: int, max_new: int) -> None:
    prompt = tok.chat([{"role": "user", "content": "Name three colours and say which one you like best."}])
    set_precision(net, "float32")
    groups = [generate(net, [prompt] * group, max_new, temperature=0.5, seed=s) for s in (0, 1)]
    g32 = [group_gradient(net, prompt, comps) for comps in groups]
    set_precision(net, "bf16")
    g16 = group_gradient(net, prompt, groups[0])
    set_precision(net, "float32")
    cos = torch.nn.functional.cosine_similarity
    print("\n| gradient of one group's GRPO loss | cosine | relative difference |\n|---|---|---|")
    print(f"| bf16 against float32, same samples | {cos(g16, g32[0], 0):.4f} | "
          f"{(g16 - g32[0]).norm() / g32[0].norm():.4f} |")
    print(f"| float32, another group of samples | {cos(g32[1], g32[0], 0):.4f} | "
          f"{(g32[1] - g32[0]).norm() / g32[0].norm():.4f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not engine.CPU_FAST_LAYOUT:
        raise SystemExit("this torch build has no oneDNN: nothing to compare")
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} threads; "
          f"oneDNN bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    if args.smoke:
        shapes, prompt_len, batches, group, answer_len, repeats = [(8, 32, 48)], 16, (1, 2), 2, 4, 1
    else:
        shapes = [(5600, 576, 1536), (5600, 1536, 576), (64, 576, 1536), (1, 576, 1536), (64, 576, 49152)]
        prompt_len, batches, group, answer_len, repeats = 600, (1, 16, 64), 8, 16, args.repeats
    print(f"\nproducts, best of {repeats}:")
    products(shapes, repeats)
    net, tok = M.load_model(args.model)
    model_parts(net, prompt_len, batches, group, answer_len, repeats)
    mismatch(net, tok, group, 4 if args.smoke else 32)
    gradient(net, tok, group, 4 if args.smoke else 32)
    set_precision(net, "float32")
    timings = precision.probe()
    print(f"\nprobe: {', '.join(f'{k} {v:.3f} ms' for k, v in timings.items())}; "
          f"--precision auto picks {precision.choose('auto', 'cpu', timings)} here")


if __name__ == "__main__":
    main()
