"""The loop learns, and its clipped ratio acts: PPO with its critic raises the reward of a computable task (as
test_train.py's GRPO test does), and an off-policy update (a second epoch) clips, with the loss of a hand-computed
clipped surrogate."""

import torch

import agents
import model as M
import train
from test_train import WORDS, flags, read_metrics, repeat_task


def dense_task(tok) -> agents.Task:
    """A reward that differs between any two outputs of a random model: the share of their characters below "n"."""
    examples = [agents.Example(tok.chat([{"role": "user", "content": f"Say: {w}"}]), w) for w in WORDS]
    return agents.Task(examples, examples[:2], lambda ex, texts: [{"reward": sum(c < "n" for c in t) / max(len(t), 1)}
                                                                  for t in texts])


def test_ppo_with_its_critic_raises_the_reward_of_a_computable_task(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["qwen2"][0]
    _, tok = M.load_model(ckpt)
    args = flags(ckpt, tmp_path, "--algo", "ppo", "--steps", 30, "--lr", 2e-3, "--critic-lr", 2e-3,
                 "--max-new-tokens", 6, "--group-size", 8, "--questions-per-step", 4, "--beta", 0,
                 "--val-every", 30, "--save-every", 30)
    train.run(args, repeat_task(tok))
    rows = [r for r in read_metrics(tmp_path) if "reward" in r]
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 30
    assert last > 2 * first and last > first + 0.15, rewards
    assert all(r["value_grad_norm"] > 0 for r in rows)  # the critic is trained at every step


def hand_surrogate(model, minibatch, temperature: float, eps: float) -> tuple[float, float]:
    """(token-mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), share of tokens clipped) over the minibatch,
    rho = exp(log pi(token) - the sampler's log-prob), log pi from a plain forward of prompt + completion (not the
    loss pass's shared-prompt route)."""
    total, clipped, n = 0.0, 0, 0
    with torch.no_grad():
        for g in minibatch:
            for i, c in enumerate(g.completions):
                logits = model(torch.tensor([g.prompt + c]))[0, len(g.prompt) - 1:-1].float() / temperature  # [T, V]
                logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0]
                rho, adv = (logp - g.old_logp[i, :len(c)]).exp(), g.advantages[i, :len(c)]
                plain, cut = -adv * rho, -adv * rho.clamp(1 - eps, 1 + eps)
                total += torch.maximum(plain, cut).sum().item()
                clipped += int((cut > plain).sum())
                n += len(c)
    return total / n, clipped / n


def test_a_second_epoch_clips_and_its_loss_is_the_hand_computed_surrogate(tiny_checkpoints, tmp_path, monkeypatch):
    """GRPO, two epochs over one rollout at a large lr: the first update is on-policy (ratio 1, nothing clipped);
    the second sees the moved policy against the sampler's log-probs, clips some tokens, and its loss and clip
    fraction are those of the clipped surrogate computed by hand before that update."""
    ckpt = tiny_checkpoints["qwen2"][0]
    _, tok = M.load_model(ckpt)
    real, seen = train.minibatch_step, []

    def spy(policy, opt, minibatch, args, critic=None, critic_opt=None, on_policy=False):
        want = None if on_policy else hand_surrogate(policy.inner, minibatch, args.temperature, args.clip_low)
        stats = real(policy, opt, minibatch, args, critic, critic_opt, on_policy)
        seen.append((on_policy, want, stats))
        return stats
    monkeypatch.setattr(train, "minibatch_step", spy)
    args = flags(ckpt, tmp_path, "--steps", 1, "--ppo-epochs", 2, "--lr", 0.3, "--max-new-tokens", 6,
                 "--group-size", 4, "--questions-per-step", 4, "--beta", 0, "--val-every", 1, "--save-every", 1)
    train.run(args, dense_task(tok))
    (first, _, on), (second, want, off) = seen
    assert first and on["clip_frac"] == 0.0 and not second
    loss, frac = want
    assert off["clip_frac"] > 0 and abs(off["clip_frac"] - frac) < 1e-6, (off["clip_frac"], frac)
    assert abs(off["loss"] - loss) < 1e-4, (off["loss"], loss)
