"""The GRPO loss pass (forward + backward of G completions' log-probs): shared prompt vs one sequence each.

    python bench/bench_loss_pass.py                 # SmolLM2-135M, ~330-token prompt, G = 8, 64-token answers
    python bench/bench_loss_pass.py --smoke --model CKPT    # the smallest setting (the test suite runs it)

The shared-prompt pass (model.completion_logprobs) runs the prompt once and lets the G completions
attend to its keys and values; the plain pass runs G full sequences. Prints seconds per pass (best of 3).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losspass  # noqa: E402
import model as M  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=M.OFFLINE_SMOLLM2)
    ap.add_argument("--prompt-tokens", type=int, default=330)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: 16 + 4 tokens, G = 2, float32, once")
    args = ap.parse_args()
    if args.smoke:
        args.prompt_tokens, args.group, args.answer_tokens, args.dtypes, args.repeats = 16, 2, 4, "float32", 1
    g = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes.split(","):
        net, _ = M.load_model(args.model, dtype=getattr(torch, dtype_name))
        top = min(40000, net.cfg.vocab_size)  # token ids 100..40000, or the whole vocabulary of a smaller model
        prompt = torch.randint(100, top, (args.prompt_tokens,), generator=g).tolist()
        answers = [torch.randint(100, top, (args.answer_tokens,), generator=g).tolist() for _ in range(args.group)]

        def shared():
            logp, mask = losspass.completion_logprobs(net, prompt, answers)
            logp.sum().backward()

        def plain():
            ids = torch.tensor([prompt + a for a in answers])
            h = net.hidden_states(ids)[:, len(prompt) - 1:-1]  # LM head on the answer positions only
            logits = net.lm_head(h).float()
            torch.log_softmax(logits, -1).gather(-1, ids[:, len(prompt):, None]).sum().backward()

        for name, fn in [("shared prompt", shared), ("plain", plain)]:
            best = float("inf")
            for _ in range(args.repeats):
                net.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            print(f"{dtype_name}: {name:13s} {best:6.2f} s per forward+backward "
                  f"({args.group} x ({args.prompt_tokens} + {args.answer_tokens}) tokens)", flush=True)


if __name__ == "__main__":
    main()
