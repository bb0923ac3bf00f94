"""Train Memory-R1's Answer Agent or Memory Manager with outcome reward, GRPO or PPO, in a plain torch loop.

    python train.py --algo grpo                       # the main command: GRPO on the Answer Agent, preset cpu
    python train.py --algo grpo --agent manager --decision-head     # then the Memory Manager (decision.py)
    python train.py --algo ppo --model Qwen/Qwen2.5-7B-Instruct --preset paper --out runs/ppo
    python train.py --algo grpo --resume --steps 48   # continue the main run, killed or for more steps (32 more)
    torchrun --nproc_per_node 4 train.py --algo grpo --preset paper   # rollouts and loss pass over 4 ranks

One step (paper Alg. 2 for the Answer Agent, Alg. 1 for the Memory Manager; docs/method.md sections 1 and 5):
    1. rollout      questions_per_step prompts, group_size completions of each in the agent's format (the
                    sampler's log-probs are the "old" policy), each scored by the task: the answer's EM or F1,
                    or for the manager the frozen answerer's score on the bank its events edited
    2. advantages   GRPO: normalised within each group, a frozen reference for the beta * KL term;
                    PPO: the KL penalty in the reward, a critic's values, GAE
    3. update       epochs x minibatches; one loss pass a minibatch, each shared token once (losspass.py);
                    gradients accumulate over a minibatch, then clip and AdamW
    4. log, save    a JSON line per step in OUT/metrics.jsonl, greedy validation every val_every steps, and
                    OUT/checkpoint replaced atomically (checkpoint.py); --resume continues it exactly

All randomness derives from (seed, step), so a resumed run takes the very steps the killed one would have. Under
torchrun (parallel.py) each rank takes a share of the prompts, rank 0 logs and saves; alone, parallel.* passes through.
Read next: agents.py (the two agents as tasks and rewards), then grpo.py and ppo.py (the losses).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import decision
import engine
import lora
import model as M
import precision
from agents import Example, Task, answer_task, manager_task, trained_setting
from checkpoint import (checkpoint_to_resume, export_merged, load_models, load_training_state, make_optimizer,
                        metrics_log, save_training_state)
from flags import parse_args
from grammar import allowed_masks
from grpo import agg_denominator, compute_grpo_outcome_advantage, grpo_loss, zero_std_group_fraction
from metrics import held_out_summary, mean_scores, peak_rss_gb, rollout_stats, standard_error
from parallel import (all_sum, backward, barrier, clip_gradients, gather_lists, init_distributed, my_share, no_sync,
                      prepare_models, this_rank, validation_share)
from plot import save_curves
from ppo import compute_value_loss, step_advantages
from prompts import decision_marker
from sampling import generate

# ------------------------------ 1. Rollout: G samples per prompt, their rewards, their advantages


@dataclass
class Group:
    """One prompt's G completions. Tensors are [G, T], right-padded, T = the longest completion."""
    prompt: list[int]
    completions: list[list[int]]
    old_logp: torch.Tensor  # log-probs at sampling time (the ratio's denominator)
    mask: torch.Tensor
    scores: list[dict]
    ref_logp: torch.Tensor | None = None  # frozen reference, when beta > 0
    advantages: torch.Tensor | None = None
    old_values: torch.Tensor | None = None  # PPO critic at rollout time
    returns: torch.Tensor | None = None
    guide: object = None  # the output format the completions followed (grammar.Guide)
    supports: list | None = None  # per completion and token: the ids top-p kept (top_p < 1)
    n_vocab: int = 0  # rows of the policy's output layer

    def allowed(self) -> torch.Tensor | None:
        """[G, T, V]: what each token was sampled from, for the loss pass (None: the whole vocabulary)."""
        return allowed_masks(self.completions, self.n_vocab, self.guide, self.supports)


def pad(rows: list[list[float]], dtype=torch.float32) -> torch.Tensor:
    """[len(rows), longest]: each row right-padded with zeros."""
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(r, dtype=dtype) for r in rows], batch_first=True)


def step_examples(task: Task, step: int, args) -> list[Example]:
    """The prompts of one step: a seeded shuffle per epoch over the training set, consumed in order. With
    dynamic sampling each step owns a window of (1 + R) x questions_per_step prompts (rounds of its rollout),
    so the prompts of a step depend on its number alone and a resumed run takes the same ones."""
    n, orders, out = len(task.train), {}, []
    size = args.questions_per_step * (1 + args.dynamic_sampling)
    for i in range(step * size, (step + 1) * size):
        epoch, pos = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(f"{args.seed}-{epoch}").shuffle(orders[epoch])
        out.append(task.train[orders[epoch][pos]])
    return out


@torch.no_grad()
def rollout(policy, tok, task: Task, examples: list[Example], step: int, args, ref=None, critic=None, offset=0):
    """Sample and score G completions per prompt (this rank's share, the first being prompt `offset` of the step),
    then attach advantages: GRPO's, or PPO's values, returns and advantages. Returns (groups, the step's stats).
    With --dynamic-sampling R (DAPO) `examples` holds 1 + R rounds of prompts, sampled until questions_per_step
    groups whose rewards differ are found (equal rewards teach nothing); fewer are filled up with tied ones.
    `ref` may be the policy itself (LoRA): its log-probs are then taken with the adapters disabled."""
    Q = args.questions_per_step if args.dynamic_sampling else len(examples)
    groups, sampled = [], []
    for r in range(0, len(examples), Q):
        fresh = sample_groups(policy, tok, task, examples[r:r + Q], step, args, offset + r)
        sampled += fresh
        groups += [g for g in fresh if not args.dynamic_sampling or len({s["reward"] for s in g.scores}) > 1]
        if len(groups) >= Q:
            break
    kept = {id(g) for g in groups}
    groups = (groups + [g for g in sampled if id(g) not in kept])[:Q]  # informative groups first
    prompts, completions = [g.prompt for g in groups], [g.completions for g in groups]
    if ref is not None:  # the reference's distribution over the same tokens as the policy's (one loss pass)
        with lora.adapters_disabled(ref):
            ref_logps = ref.group_logprobs(prompts, completions, args.temperature, True, [g.allowed() for g in groups])
        for g, (ref_logp, _) in zip(groups, ref_logps):
            g.ref_logp = ref_logp
    if critic is not None:
        for g, values in zip(groups, critic.group_values(prompts, completions)):
            g.old_values = values
    rewards = torch.tensor([s["reward"] for g in groups for s in g.scores])  # [N * G], group by group
    if args.algo == "grpo":
        grpo_advantages(groups, rewards, args)
    else:
        step_advantages(groups, rewards, args.group_size, args.beta if ref is not None else 0.0, args.gamma, args.lam)
    stats = rollout_stats(groups, args, policy.stop_ids)
    if args.dynamic_sampling:  # what the rounds saw before the equal-reward groups were set aside
        every = torch.tensor([s["reward"] for g in sampled for s in g.scores])
        stats.update(sampled_groups=len(sampled), sampled_zero_std_groups=zero_std_group_fraction(every, args.group_size))
    return groups, stats


def sample_groups(policy, tok, task: Task, examples: list[Example], step: int, args, offset: int) -> list[Group]:
    """G samples of each prompt (generate calls of `rollout_batch` prompts), then every score at once."""
    G, dev = args.group_size, policy.lm_head.weight.device
    sampled = []
    for i in range(0, len(examples), args.rollout_batch):
        chunk = examples[i:i + args.rollout_batch]
        prompts = [ex.prompt for ex in chunk for _ in range(G)]  # each prompt G times: prefilled once
        tokens, logps, supports = generate(policy, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                           seed=args.seed * 1_000_003 + step * 1_009 + offset + i,
                                           return_logprobs=True, sync_steps=args.fsdp,
                                           guide=[ex.guide for ex in chunk for _ in range(G)], return_supports=True)
        sampled += [(ex, tokens[j * G:(j + 1) * G], logps[j * G:(j + 1) * G], supports[j * G:(j + 1) * G])
                    for j, ex in enumerate(chunk)]
    # the outcome reward, and what to log: all prompts at once (the manager batches its frozen answerer)
    scores = task.score_all([(ex, [tok.decode(c) for c in comps]) for ex, comps, _, _ in sampled])
    return [Group(ex.prompt, comps, pad(lps).to(dev), pad([[1] * len(c) for c in comps], torch.bool).to(dev), sc,
                  guide=ex.guide, supports=sup if args.top_p < 1 else None, n_vocab=policy.lm_head.weight.shape[0])
            for (ex, comps, lps, sup), sc in zip(sampled, scores)]


def grpo_advantages(groups: list[Group], rewards: torch.Tensor, args) -> None:
    """(r - mean) / std within each group (docs/method.md 5.1), the same for every token of a completion."""
    G = args.group_size
    adv = compute_grpo_outcome_advantage(rewards, G, scale=not args.no_adv_scale)  # [N * G]
    for k, g in enumerate(groups):
        g.advantages = adv[k * G:(k + 1) * G, None].to(g.mask.device).expand(g.mask.shape) * g.mask  # [G, T]


# ------------------------------ 2. Update: epochs x minibatches, gradients accumulated over a minibatch


def micro_batches(g: Group, size: int) -> list[Group]:
    """A group as chunks of `size` completions (0: whole), each cut to its longest completion: each chunk's
    loss pass runs the prompt again, trading time for memory when prompts are long and G is large."""
    if size == 0 or size >= len(g.completions):
        return [g]
    out = []
    for s in range(0, len(g.completions), size):
        rows, T = slice(s, s + size), max(map(len, g.completions[s:s + size]))
        cut = {f: getattr(g, f)[rows, :T] for f in ("old_logp", "mask", "ref_logp", "advantages", "old_values",
                                                     "returns") if getattr(g, f) is not None}
        out.append(replace(g, completions=g.completions[rows], scores=g.scores[rows],
                           supports=None if g.supports is None else g.supports[rows], **cut))
    return out


def update(policy, opt, groups: list[Group], step: int, args, critic=None, critic_opt=None) -> dict:
    """PPO epochs over the rollout, split into minibatches by prompt, one optimizer step each. policy and critic are
    the loss-pass modules (parallel.prepare_models; per group (logp, mask), and values); opt holds the parameters."""
    sums, counts = {}, {}
    policy.train()  # LoRA dropout, if any, acts here only (sampling and the reference run in eval mode)
    for epoch in range(args.ppo_epochs):
        order = list(range(len(groups)))
        random.Random(f"{args.seed}-update-{step}-{epoch}").shuffle(order)
        for mb_idx in range(args.minibatches):
            minibatch = [groups[i] for i in order[mb_idx::args.minibatches]]
            if not minibatch:
                continue
            # the first optimizer step of a rollout is on-policy: its weights are the sampler's
            stats = minibatch_step(policy, opt, minibatch, args, critic, critic_opt, epoch == 0 and mb_idx == 0)
            for k, v in stats.items():  # each key's mean over the optimizer steps that report it
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
    policy.eval()
    out = {k: v / counts[k] for k, v in sums.items()}
    if args.algo == "ppo":
        out.pop("kl", None)  # PPO reports the rollout's KL instead (rollout_stats)
    return out


def minibatch_step(policy, opt, minibatch: list[Group], args, critic=None, critic_opt=None,
                   on_policy: bool = False) -> dict:
    """One loss pass over the minibatch (its prompts' shared prefix once; with micro_batch, one per chunk), its
    backward, clip and step. Each group's loss is normalised by the whole minibatch's denominator (over every rank),
    so the sum is the gradient of the minibatch's loss (docs/method.md section 5).
    `on_policy`: no step has been taken since the rollout, so the ratio's old log-probs are the loss pass's
    own (detached: the ratio is exactly 1, as TRL and verl compute it); the sampler's differ from them by
    float32 rounding, or bf16's (precision.py), logged as `logp_mismatch`. Later steps take the sampler's."""
    denom, n_tokens = all_sum([agg_denominator(args.loss_agg, [g.mask for g in minibatch], args.max_new_tokens),
                               sum(g.mask.sum().item() for g in minibatch)])
    beta = args.beta if args.algo == "grpo" else 0.0  # PPO's KL sits in the reward instead
    stats = dict.fromkeys(["loss", "clip_frac", "kl"] + ["value_loss", "value_clip_frac"] * (critic is not None) +
                          ["logp_mismatch"] * on_policy, 0.0)  # logp_mismatch: mean |sampler's - the pass's| per token
    work = [minibatch] if args.micro_batch == 0 else [[c] for g in minibatch for c in micro_batches(g, args.micro_batch)]
    for i, part in enumerate(work):
        prompts, completions, last = [c.prompt for c in part], [c.completions for c in part], i == len(work) - 1
        with no_sync(policy, last=last), no_sync(critic, last=last):  # ranks sync gradients at the last backward
            values = critic(prompts, completions, args.checkpointing) if critic is not None else [None] * len(part)
            losses = []
            for c, (logp, mask), v in zip(part, policy(prompts, completions, args.temperature, args.checkpointing,
                                                       [c.allowed() for c in part]), values):
                w = c.mask.sum().item() / n_tokens  # this chunk's share of the minibatch's tokens
                loss, st = grpo_loss(logp, logp.detach() if on_policy else c.old_logp, c.ref_logp, c.advantages,
                                     mask, beta, args.clip_low, args.clip_high, args.loss_agg, denom)
                for k, x in (("loss", loss.item()), ("clip_frac", w * st["clip_frac"]), ("kl", w * st["kl"])):
                    stats[k] += x
                if on_policy:
                    stats["logp_mismatch"] += ((logp.detach() - c.old_logp).abs() * mask).sum().item() / n_tokens
                if critic is not None:  # the critic's loss, token-mean over the minibatch (its own parameters)
                    vloss, vclip = compute_value_loss(v, c.old_values, c.returns, mask, args.value_clip)
                    loss = loss + w * vloss
                    stats["value_loss"] += w * vloss.item()
                    stats["value_clip_frac"] += w * vclip.item()
                losses.append(loss)
            backward(sum(losses))
    stats = all_sum(stats)  # every rank's share
    stats["grad_norm"] = clip_gradients(opt, args.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if critic is not None:
        stats["value_grad_norm"] = clip_gradients(critic_opt, args.grad_clip)
        critic_opt.step()
        critic_opt.zero_grad(set_to_none=True)
    # the rollout engine decodes from its own copy of the weights (engine.py): synced, as verl syncs vLLM's
    stats["sync_s"] = engine.sync(policy) + (engine.sync(critic) if critic is not None else 0.0)
    return stats


# ------------------------------ 3. Validation: greedy answers, the task's scores


@torch.no_grad()
def validate(policy, tok, task: Task, args) -> dict:
    """Greedy answers to the validation prompts; the means of their scores, keys prefixed with val_."""
    examples = task.val[:args.val_limit] if args.val_limit else task.val
    mine, n_real = validation_share(examples, lock_step=args.fsdp)
    scores = []
    for i in tqdm(range(0, len(mine), args.val_batch), desc="validate", leave=False, disable=this_rank() > 0):
        chunk = mine[i:i + args.val_batch]
        guides = [ex.guide for ex in chunk]
        if args.decision_head:  # the manager's first decision: the head's likelier arm (decision.py)
            guides = decision.greedy_guides(policy, [ex.prompt for ex in chunk], guides, decision_marker(tok))
        outs = generate(policy, [ex.prompt for ex in chunk], args.max_new_tokens, temperature=0,
                        sync_steps=args.fsdp, guide=guides)
        scores += [rows[0] for rows in task.score_all([(ex, [tok.decode(out)]) for ex, out in zip(chunk, outs)])]
    every = gather_lists({"scores": scores[:n_real]})["scores"]
    out = mean_scores(every, "val_")  # and the noise of the held-out figures: standard errors over the prompts
    out.update({f"val_{k}_se": standard_error([s[k] for s in every]) for k in ("reward", "em", "f1")
                if k in every[0]}, val_n=len(every))
    return out


# ------------------------------ 4. The loop


def run(args, task: Task | None = None) -> dict:
    """Train; returns the last validation metrics. `task` replaces the agent's own (tests pass their own)."""
    out = Path(args.out)
    if args.export_merged:
        return export_merged(out, Path(args.export_merged))
    rank, world = init_distributed(args)
    main = rank == 0  # rank 0 logs, shows progress and writes checkpoints
    if args.questions_per_step % world:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} must be a multiple of the {world} ranks")
    if (args.dynamic_sampling or args.decision_head) and world > 1:
        raise SystemExit("--dynamic-sampling and --decision-head run in one process (ranks would keep other groups)")
    ckpt = checkpoint_to_resume(out, args.resume, args.model)
    dev = torch.device(args.device)
    # bf16 products where they pay, chosen before loading; a resumed run keeps its float32 kernel (its rounding)
    pack = trained_setting(str(ckpt), "pack_float32", None) if ckpt else None
    args.precision = precision.configure(args.precision, dev, pack)
    args.pack_float32 = precision.PACK_FLOAT32
    base, tok = M.load_model(args.model, getattr(torch, args.dtype), dev)
    if task is None:  # the banks and prompts are built from the starting model, also on resume
        task = (answer_task if args.agent == "answer" else manager_task)(args, tok, base)
    policy, ref, critic = load_models(args, base, ckpt)
    if args.decision_head:  # the network frozen, the head's w alone trains (decision.py)
        decision.attach(policy, ckpt, random.Random(f"{args.seed}-head").sample(task.train, len(task.train)),
                        decision_marker(tok))
    policy_pass, critic_pass = prepare_models(policy, ref, critic, dev, args.fsdp)
    opt = make_optimizer(policy, args.lr, args.optimizer, args.weight_decay)
    critic_opt = make_optimizer(critic, args.critic_lr, weight_decay=args.weight_decay) if critic is not None else None
    start = load_training_state(ckpt, opt, policy, critic, critic_opt) if ckpt else 0
    engine.sync(policy)  # weights loaded in place: the rollout engine's copies follow
    log = metrics_log(out / "metrics.jsonl", start if ckpt else None, main)
    if main:
        what = "LoRA" if args.lora_rank else "the decision head" if args.decision_head else "full fine-tuning"
        print(f"{args.algo} on the {args.agent} agent ({what}), preset {args.preset}, {world} rank(s): {len(task.train)} "
              f"training and {len(task.val)} validation prompts; steps {start} -> {args.steps} in {out}", file=sys.stderr)
    val = {}
    if start == 0 and args.steps > 0:
        val = validate(policy, tok, task, args)
        log({"step": 0, **val})
    bar = tqdm(range(start, args.steps), desc=f"{args.algo} steps", initial=start, total=args.steps,
               disable=not main)
    for step in bar:
        t0 = time.perf_counter()
        if step >= args.em_from > 0:  # the cpu preset's second phase: the paper's exact match (flags.py)
            args.reward = "em"  # (the answer task's score reads args.reward)
        examples, offset = my_share(step_examples(task, step, args))
        if args.decision_head:  # the manager's small-model recipe: its own rollout and update (decision.py)
            roll = decision.train_step(policy, opt, tok, task, examples, step, args, decision_marker(tok))
            upd, t1 = {}, time.perf_counter()  # (its update is inside: rollout_s holds both)
        else:
            groups, roll = rollout(policy, tok, task, examples, step, args, ref, critic, offset)  # sample, score
            t1 = time.perf_counter()
            upd = update(policy_pass, opt, groups, step, args, critic_pass, critic_opt)  # loss, step
        t2 = time.perf_counter()
        record = {"step": step + 1, **roll, **upd, "lr": args.lr, "rollout_s": t1 - t0, "update_s": t2 - t1}
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            val = validate(policy, tok, task, args)
            record.update(val)
        log({**record, "seconds": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb()})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_training_state(out, step + 1, policy, tok, opt, args, critic, critic_opt)
            barrier()  # nobody runs ahead of a checkpoint being written
        bar.set_postfix(reward=f"{roll['reward']:.3f}", **{k: f"{v:.3f}" for k, v in val.items() if k == "val_f1"})
    if main:
        print(held_out_summary(out / "metrics.jsonl"), file=sys.stderr)
        print(save_curves(out / "metrics.jsonl"), file=sys.stderr)  # OUT/curves.png, when matplotlib is there
    return val


if __name__ == "__main__":
    run(parse_args(description=__doc__))
