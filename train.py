"""Train Memory-R1's Answer Agent or Memory Manager with outcome reward, GRPO or PPO, in a plain torch loop.

    python train.py --algo grpo                        # offline SmolLM2 on the memory gym; preset "cpu" without a GPU
    python train.py --algo ppo --model Qwen/Qwen2.5-7B-Instruct --preset paper --out runs/ppo
    python train.py --algo grpo --agent manager --out runs/manager     # the Memory Manager (agents.py)
    python train.py --algo grpo --out runs/grpo --resume   # continue a killed run from its checkpoint
    python train.py --algo grpo --lora-rank 16 --out runs/lora           # train LoRA adapters only
    python train.py --out runs/lora --export-merged runs/lora-merged     # adapters folded into a HF folder
    torchrun --nproc_per_node 4 train.py --algo grpo --preset paper ...  # rollouts and loss pass over 4 ranks

One training step (paper Alg. 2 for the Answer Agent, Alg. 1 for the manager; SPEC sections 1 and 5):
    1. rollout   take `questions_per_step` prompts (questions; for the manager, evidence turns); sample
                 `group_size` completions of each (temperature 1, in the agent's output format by construction
                 with --guided, the default; log-probs of the sampled tokens = the "old" policy); reward =
                 exact match of the text after **Answer:** with the gold (flag: F1); the manager's: that of a
                 frozen answerer answering the turn's questions from the bank its events edited
    2. signal    GRPO: group-normalised advantages, a frozen reference for the beta * k3 KL term;
                 PPO: per-token KL penalty in the reward, a critic's values, GAE advantages and returns
    3. update    epochs x minibatches over the rollout; each prompt's group is one micro-batch whose loss
                 pass runs the prompt once (losspass.completion_logprobs); gradients accumulate over a
                 minibatch, then clip and AdamW; the rollout engine's weights (engine.py) are then synced
    4. log       one JSON line per step in OUT/metrics.jsonl; greedy validation every `val_every` steps
    5. save      OUT/checkpoint/: a Hugging Face folder (loadable by transformers and model.load_model)
                 plus optimizer state and the step, replaced atomically; --resume continues from it

All randomness derives from (seed, step): sampling seeds and the question order are recomputed on resume,
so a resumed run takes the very steps the killed one would have.

Under torchrun (parallel.py) each rank takes a contiguous share of the step's prompts; DDP averages the
gradients, or FSDP2 shards weights, gradients and optimizer state (--fsdp); the loss is normalised by the
whole step's token count, so the sum over ranks is the one-process loss; rewards and metrics are
gathered; rank 0 logs and saves. A checkpoint holds whole weights (or adapters), so --resume works with
any number of ranks. In one process every parallel.* call is a pass-through.

The pieces, read before this file: agents.py (the tasks and rewards), grpo.py and ppo.py (the losses),
model.py and sampling.py (the policy and its decoding), checkpoint.py (saving and resuming), flags.py (the
presets and every switch). Read next: evaluate.py, then plot.py (the curves.png each run draws).
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
from agents import DECISIONS, Example, Task, answer_task, hold_decision_prior, manager_task
from checkpoint import (checkpoint_to_resume, export_merged, load_trainable_state, load_training_state,
                        make_optimizer, metrics_log, save_training_state)
from grammar import DecisionTemperature, allowed_masks, arm_guides, choice_slots, decision_slots
from flags import parse_args
from grpo import (agg_denominator, agg_loss, compute_all_arms_advantage, compute_grpo_outcome_advantage, grpo_loss,
                  kl_penalty, project_out_choices, zero_std_group_fraction)
from metrics import held_out_summary, mean_scores, peak_rss_gb, standard_error
from parallel import (all_sum, backward, barrier, clip_gradients, concat_over_ranks, gather_lists, init_distributed,
                      my_share, no_sync, prepare_models, this_rank, validation_share)
from plot import save_curves
from ppo import Critic, compute_gae_advantage_return, compute_token_rewards, compute_value_loss, masked_whiten
from prompts import decision_marker
from sampling import generate

# --------------------------------------------------------------------------------------------------
# 1. Rollout: G samples per prompt, their rewards, and what the update needs from the old policy
# --------------------------------------------------------------------------------------------------


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
    arms: torch.Tensor | None = None  # --all-arms: [G] the arm each output was given, the decision's position,
    arm_slot: int = 0
    logp_new: torch.Tensor | None = None  # and the policy's log P("new") there (a scalar)
    slot: tuple | None = None  # --decision-head: (L, h) there, None if no memory is shown (decision.py)

    def allowed(self) -> torch.Tensor | None:
        """[G, T, V]: what each token was sampled from, for the loss pass (None: the whole vocabulary)."""
        return allowed_masks(self.completions, self.n_vocab, self.guide, self.supports)


def pad(rows: list[list[float]], dtype=torch.float32) -> torch.Tensor:
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


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
    """Sample and score G completions per prompt; attach advantages (GRPO) or values, returns and advantages
    (PPO) to each group. Returns (groups, statistics of the whole step).
    `examples` are this rank's share of the step's prompts, the first being prompt number `offset` of the
    step: sampling seeds follow the global index, so the samples do not depend on the number of ranks.
    `ref` may be the policy itself (LoRA): its log-probs are then taken with the adapters disabled.
    With --dynamic-sampling R (DAPO), `examples` holds 1 + R rounds of questions_per_step prompts, sampled
    until questions_per_step groups with unequal rewards are found (equal rewards: zero advantage, nothing
    learnt); a step that finds fewer is filled up with equal-reward groups, so every step has the same size."""
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
    if args.decision_head:  # P("new") = sigmoid(L + s(h)): the head's, and its states for the update
        decision.mark_rollout(policy, groups, args.decision_marker)
    for g in groups:
        # an arm is sampled renormalised over its tokens: log P("new") = the difference (the head's: above)
        if g.arms is not None and not args.decision_head:
            full, _ = policy.logprobs(g.prompt, g.completions, policy_temperature(args), True, g.allowed())
            g.logp_new, g.old_logp = (full - g.old_logp)[g.arms == 0][0, g.arm_slot].cpu(), full
        if ref is not None:  # the reference's distribution over the same tokens as the policy's
            with lora.adapters_disabled(ref):
                g.ref_logp, _ = ref.logprobs(g.prompt, g.completions, policy_temperature(args), True, g.allowed())
        if critic is not None:
            g.old_values = critic.completion_values(g.prompt, g.completions)
    rewards = torch.tensor([s["reward"] for g in groups for s in g.scores])  # [N * G], group by group
    prior = grpo_advantages(groups, rewards, args) if args.algo == "grpo" else {}  # --hold-prior's share
    if args.algo == "ppo":
        ppo_advantages(groups, rewards, args, args.beta if ref is not None else 0.0)
    stats = {**rollout_stats(groups, args, policy.stop_ids), **prior}
    if args.dynamic_sampling:  # what the rounds saw before the equal-reward groups were set aside
        every = torch.tensor([s["reward"] for g in sampled for s in g.scores])
        stats.update(sampled_groups=len(sampled), sampled_zero_std_groups=zero_std_group_fraction(every, args.group_size))
        mix = mean_scores([s for g in sampled for s in g.scores])  # the manager's decisions, before any was dropped
        stats.update({f"sampled_{k}": v for k, v in mix.items() if k.startswith("dec_")})
    return groups, stats


def policy_temperature(args):
    """What the policy samples at and its log-probs use: --temperature, or with --decision-temperature that
    one at the manager's decision slot (grammar.DecisionTemperature)."""
    return (DecisionTemperature(args.temperature, args.decision_temperature, args.decision_marker)
            if args.decision_temperature else args.temperature)


def sample_groups(policy, tok, task: Task, examples: list[Example], step: int, args, offset: int) -> list[Group]:
    """G samples of each prompt (generate calls of --rollout-batch prompts), then every score at once."""
    G, dev = args.group_size, policy.lm_head.weight.device
    sampled, arms = [], {}
    for i in range(0, len(examples), args.rollout_batch):
        chunk = examples[i:i + args.rollout_batch]
        prompts = [ex.prompt for ex in chunk for _ in range(G)]  # each prompt G times: prefilled once
        arms.update({id(ex): arm_guides(ex.guide, args.decision_marker, G) for ex in chunk} if args.all_arms else {})
        guides = [g for ex in chunk for g in (arms[id(ex)][0] if args.all_arms else [ex.guide] * G)]  # arms alternate
        tokens, logps, supports = generate(policy, prompts, args.max_new_tokens, policy_temperature(args), args.top_p,
                                           seed=args.seed * 1_000_003 + step * 1_009 + offset + i,
                                           return_logprobs=True, sync_steps=args.fsdp,
                                           guide=guides, return_supports=True)
        sampled += [(ex, tokens[j * G:(j + 1) * G], logps[j * G:(j + 1) * G], supports[j * G:(j + 1) * G])
                    for j, ex in enumerate(chunk)]
    # the outcome reward, and what to log: all prompts at once (the manager batches its frozen answerer)
    scores = task.score_all([(ex, [tok.decode(c) for c in comps]) for ex, comps, _, _ in sampled])
    groups = []
    for (ex, comps, lps, sup), sc in zip(sampled, scores):
        mask = pad([[1] * len(c) for c in comps], torch.bool).to(dev)
        _, arm, slot = arms.get(id(ex), (None, None, 0))
        groups.append(Group(ex.prompt, comps, pad(lps).to(dev), mask, sc, guide=ex.guide, arms=arm, arm_slot=slot,
                            supports=sup if args.top_p < 1 else None, n_vocab=policy.lm_head.weight.shape[0]))
    return groups


def grpo_advantages(groups: list[Group], rewards: torch.Tensor, args) -> dict:
    """(r - mean) / std within each group (SPEC 5), the same for every token of a completion; --all-arms: the
    forced first decisions reweighted (grpo.compute_all_arms_advantage); --hold-prior: minus what the decision of
    each output explains, so a step cannot move a decision's shared prior (grpo.project_out_choices, share logged)."""
    G, stats, expected = args.group_size, {}, None
    if args.all_arms:  # every arm tried in every group
        arms = torch.cat([g.arms for g in groups])  # [N * G]: 0 "new", 1 a memory, whose P is 1 - P(new)
        new = torch.stack([g.logp_new for g in groups]).exp().repeat_interleave(G)  # P("new") in each output's state
        adv = compute_all_arms_advantage(rewards, arms, torch.where(arms == 0, new, 1 - new).log(), G, not args.no_adv_scale)
        stats["arm_p_new"] = new[arms == 1].mean().nan_to_num(1.0).item()  # where a memory was shown
        made, expected = torch.stack([arms == 0, arms == 1], -1), torch.stack([new, 1 - new], -1)
    else:
        adv = compute_grpo_outcome_advantage(rewards, G, scale=not args.no_adv_scale)  # [N * G]
        made = (torch.tensor([[s[f"dec_{d.lower()}"] for d in DECISIONS] for g in groups for s in g.scores])  # [N*G, 5]
                if args.hold_prior else None)
    if args.hold_prior:  # --all-arms: centred on the policy's P(new), not on the group's frequency
        adv, stats["adv_prior_share"] = project_out_choices(adv, made, G, args.prior_keep, expected)
    for k, g in enumerate(groups):
        g.advantages = adv[k * G:(k + 1) * G, None].to(g.mask.device).expand(g.mask.shape) * g.mask  # [G, T]
    return stats


def ppo_advantages(groups: list[Group], rewards: torch.Tensor, args, beta: float) -> None:
    """The reward at each completion's last token minus beta * KL at every token, GAE over the critic's
    values, then the advantages whitened over the whole step's tokens (every rank's), as verl does."""
    G = args.group_size
    for k, g in enumerate(groups):
        token_rewards = compute_token_rewards(rewards[k * G:(k + 1) * G].to(g.mask.device), g.old_logp, g.ref_logp,
                                              g.mask, beta)
        g.advantages, g.returns = compute_gae_advantage_return(token_rewards, g.old_values, g.mask,
                                                               args.gamma, args.lam, whiten=False)
    every, start = concat_over_ranks(torch.cat([g.advantages[g.mask] for g in groups]))  # every response token
    flat = masked_whiten(every, torch.ones(len(every)))
    for g in groups:
        n = int(g.mask.sum())
        g.advantages = torch.zeros_like(g.advantages).masked_scatter(g.mask, flat[start:start + n].to(g.mask.device))
        start += n


def rollout_stats(groups: list[Group], args, stop_ids) -> dict:
    """Means over the whole step (every rank's groups): the scores, the reward's spread, lengths, KL."""
    stops = set(stop_ids)
    mine = {"scores": [s for g in groups for s in g.scores],
            "group_rewards": [sum(s["reward"] for s in g.scores) / len(g.scores) for g in groups],
            "lengths": [len(c) for g in groups for c in g.completions],
            "truncated": [len(c) == args.max_new_tokens and c[-1] not in stops for g in groups for c in g.completions]}
    every = gather_lists(mine)
    rewards = torch.tensor([s["reward"] for s in every["scores"]])
    stats = mean_scores(every["scores"])  # reward first, then em, f1, parse_fail, ...
    stats.update({"reward_se": standard_error(every["group_rewards"]),  # over prompts: groups are independent
                  "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                  "zero_std_groups": zero_std_group_fraction(rewards, args.group_size) if args.group_size > 1 else 1.0,
                  "response_len": sum(every["lengths"]) / len(every["lengths"]),
                  "truncated": sum(every["truncated"]) / len(every["truncated"])})
    if args.algo == "ppo" and groups[0].ref_logp is not None:  # k1 at rollout time: what the reward is penalised by
        kl, n = all_sum([torch.cat([(g.old_logp - g.ref_logp)[g.mask] for g in groups]).sum().item(),
                         sum(g.mask.sum().item() for g in groups)])
        stats["kl"] = kl / n
    return stats


# --------------------------------------------------------------------------------------------------
# 2. Update: epochs x minibatches, one group per micro-batch, gradients accumulated over a minibatch
# --------------------------------------------------------------------------------------------------


def micro_batches(g: Group, size: int) -> list[Group]:
    """A group as chunks of `size` completions (0: whole), each cut to its longest completion: each chunk's
    loss pass runs the prompt again, trading time for memory when prompts are long and G is large."""
    if size == 0 or size >= len(g.completions):
        return [g]
    out = []
    for s in range(0, len(g.completions), size):
        rows = slice(s, s + size)
        T = max(map(len, g.completions[rows]))
        cut = {f: getattr(g, f)[rows, :T] for f in ("old_logp", "mask", "ref_logp", "advantages", "old_values",
                                                     "returns") if getattr(g, f) is not None}
        out.append(replace(g, completions=g.completions[rows], scores=g.scores[rows], arms=None,
                           supports=None if g.supports is None else g.supports[rows], **cut))
    return out


def update(policy, opt, groups: list[Group], step: int, args, critic=None, critic_opt=None) -> dict:
    """PPO epochs over the rollout, each split into minibatches by prompt; one optimizer step per minibatch.
    policy(prompt, completions, temperature, checkpoint) -> (logp, mask) and critic(...) -> values are the
    loss-pass modules (parallel.prepare_models); the optimizers hold the trainable parameters."""
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
    """Loss pass and backward group by group (gradients accumulate), then clip and step: one optimizer step.
    Each group's loss is normalised by the whole minibatch's denominator (over every rank), so the sum of
    the backward passes is the gradient of the minibatch's loss (SPEC 5, Aggregation).
    `on_policy`: no step has been taken since the rollout, so the ratio's old log-probs are the loss pass's
    own (detached: the ratio is exactly 1, as TRL and verl compute it); the sampler's differ from them by
    float32 rounding, or bf16's (precision.py), logged as `logp_mismatch`. Later steps take the sampler's."""
    denom, n_tokens = all_sum([agg_denominator(args.loss_agg, [g.mask for g in minibatch], args.max_new_tokens),
                               sum(g.mask.sum().item() for g in minibatch)])
    beta = args.beta if args.algo == "grpo" else 0.0  # PPO's KL sits in the reward instead
    stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0} | ({"value_loss": 0.0, "value_clip_frac": 0.0} if critic else {})
    if on_policy:
        stats["logp_mismatch"] = 0.0  # mean |sampler's log-prob - the loss pass's| per token
    work = [c for g in minibatch for c in micro_batches(g, args.micro_batch)]
    for i, c in enumerate(work):
        w = c.mask.sum().item() / n_tokens  # this chunk's share of the minibatch's tokens
        with no_sync(policy, last=i == len(work) - 1):  # gradients sync over ranks at the last backward only
            allowed = c.allowed()
            logp, mask = policy(c.prompt, c.completions, policy_temperature(args), args.checkpointing, allowed)
            kept = mask  # the tokens that carry the loss: all, the decision slots, or every choice of the format
            if args.loss_slots != "all":
                kept = mask & (decision_slots(allowed, args.decision_marker) if args.loss_slots == "about" else
                               choice_slots(allowed))
            old_logp = logp.detach() if on_policy else c.old_logp
            loss, st = grpo_loss(logp, old_logp, c.ref_logp, c.advantages, kept, beta, args.clip_low,
                                 args.clip_high, args.loss_agg, denom)
            if args.slot_beta:  # the choices left out of the loss are held near the reference's (k3 KL)
                held = mask & choice_slots(allowed) & ~kept
                loss = loss + args.slot_beta * agg_loss(kl_penalty(logp, c.ref_logp), held, args.loss_agg, denom)
            backward(loss)
        stats["loss"] += loss.item()
        stats["clip_frac"] += w * st["clip_frac"]
        stats["kl"] += w * st["kl"]
        if on_policy:
            stats["logp_mismatch"] += ((logp.detach() - c.old_logp).abs() * mask).sum().item() / n_tokens
        if critic is not None:
            with no_sync(critic, last=i == len(work) - 1):
                values = critic(c.prompt, c.completions, args.checkpointing)
                vloss, vclip = compute_value_loss(values, c.old_values, c.returns, mask, args.value_clip)
                backward(w * vloss)  # token-mean over the minibatch
            stats["value_loss"] += w * vloss.item()
            stats["value_clip_frac"] += w * vclip.item()
    if args.hold_mean:  # one process (run): the loss pass is Call(model), the model its .inner
        stats |= hold_decision_prior(policy.inner, opt, [(g.prompt, g.completions[0], g.guide) for g in minibatch], args)
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


# --------------------------------------------------------------------------------------------------
# 3. Validation: greedy answers, the task's scores
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(policy, tok, task: Task, args) -> dict:
    """Greedy answers to the validation prompts; the means of their scores, keys prefixed with val_."""
    examples = task.val[:args.val_limit] if args.val_limit else task.val
    mine, n_real = validation_share(examples, lock_step=args.fsdp)
    scores = []
    for i in tqdm(range(0, len(mine), args.val_batch), desc="validate", leave=False, disable=this_rank() > 0):
        chunk = mine[i:i + args.val_batch]
        guides = [ex.guide for ex in chunk]
        if args.decision_head:  # the first decision is the head's likelier arm
            guides = decision.greedy_guides(policy, [ex.prompt for ex in chunk], guides, args.decision_marker)
        outs = generate(policy, [ex.prompt for ex in chunk], args.max_new_tokens, temperature=0,
                        sync_steps=args.fsdp, guide=guides)
        scores += [rows[0] for rows in task.score_all([(ex, [tok.decode(out)]) for ex, out in zip(chunk, outs)])]
    every = gather_lists({"scores": scores[:n_real]})["scores"]
    out = mean_scores(every, "val_")
    # the noise of the held-out figures: standard error of the mean over prompts
    out.update({f"val_{k}_se": standard_error([s[k] for s in every]) for k in ("reward", "em") if k in every[0]})
    out["val_n"] = len(every)
    return out


# --------------------------------------------------------------------------------------------------
# 4. The models: policy, frozen reference, PPO critic; their optimizers
# --------------------------------------------------------------------------------------------------


def load_models(args, base, ckpt: Path | None):
    """(policy, ref, critic) from the starting model `base` and a checkpoint to resume. The reference is the
    starting model (also on resume); with LoRA it is the policy itself with its adapters disabled, so no
    second copy is held. ref and critic are None when not needed."""
    dtype, dev = base.lm_head.weight.dtype, base.lm_head.weight.device
    ref = None
    if args.lora_rank:
        policy = (lora.load_adapter(base, ckpt) if ckpt else
                  lora.add_lora(base, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets))
        ref = policy if args.beta > 0 else None
    else:
        policy = M.load_model(str(ckpt), dtype, dev)[0] if ckpt else base
        if args.beta > 0:
            ref = base if ckpt else M.load_model(args.model, dtype, dev)[0]
            ref.requires_grad_(False)
            engine.unpack(ref)  # it scores, never decodes: its decoding copy would cost 538 MB for SmolLM2
    critic = None
    if args.algo == "ppo":
        backbone = M.load_model(args.model, dtype, dev)[0]
        if args.lora_rank:
            lora.add_lora(backbone, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets, seed=1)
        critic = Critic(backbone)
        if ckpt:
            load_trainable_state(critic, ckpt / "critic.safetensors")
    if args.compile:
        for m in (policy, critic.backbone if critic is not None else None):
            if m is not None:
                M.compile_blocks(m, dynamic=True)
        M.compile_decode(policy)
    return policy, ref, critic


# --------------------------------------------------------------------------------------------------
# 5. The loop
# --------------------------------------------------------------------------------------------------


def run(args, task: Task | None = None) -> dict:
    """Train; returns the last validation metrics. `task` replaces the agent's own (tests pass their own)."""
    out = Path(args.out)
    if args.export_merged:
        return export_merged(out, Path(args.export_merged))
    rank, world = init_distributed(args)
    main = rank == 0  # rank 0 logs, shows progress and writes checkpoints
    if args.questions_per_step % world:
        raise SystemExit(f"--questions-per-step {args.questions_per_step} must be a multiple of the {world} ranks")
    if (args.dynamic_sampling or args.hold_mean) and world > 1:
        raise SystemExit("--dynamic-sampling and --hold-mean run in one process (ranks would keep other groups)")
    ckpt = checkpoint_to_resume(out, args.resume, args.model)
    dev = torch.device(args.device)
    args.precision = precision.configure(args.precision, dev)  # bf16 products where they pay (before loading)
    base, tok = M.load_model(args.model, getattr(torch, args.dtype), dev)
    if args.decision_temperature or args.loss_slots == "about" or args.all_arms or args.hold_mean or args.decision_head:
        args.decision_marker = decision_marker(tok)  # the token "new" marks the ops format's decision slot
    if task is None:  # the banks and prompts are built from the starting model, also on resume
        task = (answer_task if args.agent == "answer" else manager_task)(args, tok, base)
    policy, ref, critic = load_models(args, base, ckpt)
    if args.decision_head:  # the network frozen, the head's w alone trains (decision.py)
        decision.attach(policy, ckpt, random.Random(f"{args.seed}-head").sample(task.train, len(task.train)),
                        args.decision_marker)
    policy_pass, critic_pass = prepare_models(policy, ref, critic, dev, args.fsdp)
    opt = make_optimizer(policy, args.lr, args.optimizer, args.head_lr_scale, args.weight_decay)
    critic_opt = make_optimizer(critic, args.critic_lr, weight_decay=args.weight_decay) if critic is not None else None
    start = load_training_state(ckpt, opt, policy, critic, critic_opt) if ckpt else 0
    engine.sync(policy)  # weights loaded in place: the rollout engine's copies follow
    log = metrics_log(out / "metrics.jsonl", start if ckpt else None, main)
    if main:
        what = (f"LoRA rank {args.lora_rank}" if args.lora_rank else "the decision head alone" if args.decision_head
                else "full fine-tuning")
        print(f"{args.algo} on the {args.agent} agent, preset {args.preset}, {world} rank(s), {what}: "
              f"{len(task.train)} training and {len(task.val)} validation prompts; steps {start} -> {args.steps} in {out}",
              file=sys.stderr)
    val = {}
    if start == 0 and args.steps > 0:
        val = validate(policy, tok, task, args)
        log({"step": 0, **val})
    bar = tqdm(range(start, args.steps), desc=f"{args.algo} steps", initial=start, total=args.steps,
               disable=not main)
    for step in bar:
        t0 = time.perf_counter()
        examples, offset = my_share(step_examples(task, step, args))
        groups, roll = rollout(policy, tok, task, examples, step, args, ref, critic, offset)  # sample, score
        t1 = time.perf_counter()
        upd = (decision.head_step(policy, opt, groups, args.grad_clip, args.ppo_epochs if args.head_replay else 0,
                                  not args.no_adv_scale) if args.decision_head else  # loss, step
               update(policy_pass, opt, groups, step, args, critic_pass, critic_opt))
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
