"""grpo.py and ppo.py against hand-computed tensors and plain loops."""

import math

import pytest
import torch

from decision import all_arms_advantage
from grpo import (agg_loss, compute_grpo_outcome_advantage, compute_policy_loss, grpo_loss, kl_penalty,
                  zero_std_group_fraction)
from ppo import (Critic, compute_gae_advantage_return, compute_token_rewards, compute_value_loss,
                 last_token_index, masked_whiten)


def test_grpo_advantage_hand_computed_with_a_zero_variance_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = compute_grpo_outcome_advantage(rewards, 4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]: sum of squares 4 * 0.25 = 1, over 3
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    assert torch.allclose(adv[:4], want, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # equal rewards: no signal
    assert zero_std_group_fraction(rewards, 4) == 0.5
    assert torch.allclose(compute_grpo_outcome_advantage(rewards, 4, scale=False)[:4],
                          torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="divisible"):
        compute_grpo_outcome_advantage(rewards[:7], 4)


def test_all_arms_advantage_hand_computed_and_the_exact_expected_gradient():
    # one group of 6: arms 0, 1, 2 twice each, pi = (0.5, 0.3, 0.2); arm means R = (0.5, 0, 1)
    r, arms = torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    pi = torch.tensor([0.5, 0.3, 0.2])
    w = pi[arms] / 2  # pi(a_i) / m_a: (0.25, 0.15, 0.1, 0.25, 0.15, 0.1), sums to 1
    value = 0.5 * 0.5 + 0.3 * 0 + 0.2 * 1  # 0.45 = sum_a pi(a) R_a
    want = 6 * w * (r - value)  # (0.825, -0.405, 0.33, -0.675, -0.405, 0.33)
    got = all_arms_advantage(r, arms, pi[arms].log(), 6, scale=False)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got, torch.tensor([0.825, -0.405, 0.33, -0.675, -0.405, 0.33]), atol=1e-6)
    std = math.sqrt(float((w * (r - value) ** 2).sum()))
    assert torch.allclose(all_arms_advantage(r, arms, pi[arms].log(), 6), want / (std + 1e-4), atol=1e-6)
    # the surrogate's gradient on the logits is that of the expected reward sum_a pi(a) R_a, exactly
    logits = pi.log().clone().requires_grad_(True)
    (got * torch.log_softmax(logits, 0)[arms]).sum().div(6).backward()
    expected = logits.detach().clone().requires_grad_(True)
    (torch.softmax(expected, 0) * torch.tensor([0.5, 0.0, 1.0])).sum().backward()
    assert torch.allclose(logits.grad, expected.grad, atol=1e-6)
    # an arm a group did not try: the others carry its weight; equal rewards: no signal
    r2, arms2 = torch.tensor([1.0, 0, 1, 0]), torch.tensor([0, 1, 0, 1])
    part = all_arms_advantage(r2, arms2, torch.tensor([0.6, 0.2, 0.6, 0.2]).log(), 4, scale=False)
    assert torch.allclose(part, 4 * torch.tensor([0.375, 0.125, 0.375, 0.125]) * (r2 - 0.75), atol=1e-6)
    assert torch.equal(all_arms_advantage(torch.ones(4), arms2, torch.zeros(4), 4), torch.zeros(4))
    # unequal arm counts: the weight 1/m_a matters. G = 3, arms (0, 1, 0), P(new) 0.5, rewards (1, 0, 1):
    # w = (0.25, 0.5, 0.25), V = 0.5, A = 3 w (r - V) = (0.375, -0.75, 0.375)
    odd = all_arms_advantage(torch.tensor([1.0, 0, 1]), torch.tensor([0, 1, 0]), torch.full((3,), 0.5).log(), 3,
                             scale=False)
    assert torch.allclose(odd, torch.tensor([0.375, -0.75, 0.375]), atol=1e-6)
    with pytest.raises(ValueError, match="whole groups"):
        all_arms_advantage(r[:5], arms[:5], pi[arms][:5], 6)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, 0.0])
    # x = ref - logp = [-0.5, 0, 0.5]
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, 0.0, -0.5]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.0, 0.125]))
    # exp(x) - x - 1 by hand: e^-0.5 + 0.5 - 1 = 0.1065307, 0, e^0.5 - 0.5 - 1 = 0.1487213
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([0.1065307, 0.0, 0.1487213]), atol=1e-6)
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([50.0]), "k3").item() == 10.0  # clamped
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_policy_loss_hand_computed_with_asymmetric_clip_and_padding():
    # rows: A = +1 with ratios e^0.5 (clipped at 1.28), 1.1; A = -1 with ratios e^-0.5 (clipped at 0.8), 1.1
    logp = torch.tensor([[0.5, math.log(1.1)], [-0.5, math.log(1.1)]])
    old = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # the last token of row 2 is padding
    loss, clip_frac = compute_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    r = math.exp(0.5)
    want = torch.tensor([[max(-r, -1.28), -1.1], [max(math.exp(-0.5), 0.8), 1.1]])
    assert torch.allclose(loss, want, atol=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)  # tokens (0,0) and (1,0) of the three real ones
    assert agg_loss(loss, mask).item() == pytest.approx((-1.28 - 1.1 + 0.8) / 3, abs=1e-6)


def test_policy_gradient_at_ratio_one_is_minus_advantage_times_grad_logp():
    torch.manual_seed(0)
    theta = torch.randn(3, 5, requires_grad=True)
    logp = torch.log_softmax(theta, -1)[:, :4]  # [3, 4] stand-in log-probs that depend on theta
    adv = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    loss, _ = compute_policy_loss(logp, logp.detach(), adv, mask)
    (g,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
    (want,) = torch.autograd.grad((-adv * logp).sum(), theta)
    assert torch.allclose(g, want, atol=1e-6)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 6)
    # gradient accumulation: two micro-batches normalised by the step's 8 tokens add up to the whole
    assert agg_loss(loss, mask, "token-mean", denom=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="unknown aggregation"):
        agg_loss(loss, mask, "sum")


def test_grpo_loss_adds_beta_k3():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    adv = torch.tensor([[0.5, 0.5]])
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(logp, logp, ref, adv, mask, beta=0.1)
    # k3 = [e^-0.5 + 0.5 - 1, 0] = [0.1065307, 0]; the ratio is 1, so the surrogate is -A = -0.5 per token
    assert loss.item() == pytest.approx((-0.5 + 0.01065307 - 0.5) / 2, abs=1e-6)
    assert stats["kl"] == pytest.approx(0.1065307 / 2, abs=1e-6) and stats["clip_frac"] == 0
    plain, stats0 = grpo_loss(logp, logp, None, adv, mask, beta=0.0)
    assert plain.item() == pytest.approx(-0.5) and stats0["kl"] == 0
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, logp, None, adv, mask, beta=0.1)


def gae_reference(rewards, values, length, gamma, lam):
    """GAE of one sequence with a plain Python loop over its `length` real tokens."""
    adv, last = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values[:length])]


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95)])
def test_gae_equals_a_plain_loop(gamma, lam):
    torch.manual_seed(1)
    B, T = 4, 7
    lengths = [7, 3, 5, 1]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    rewards, values = torch.randn(B, T), torch.randn(B, T)  # garbage on padding must not leak in
    adv, ret = compute_gae_advantage_return(rewards, values, mask, gamma, lam, whiten=False)
    for b, n in enumerate(lengths):
        want_adv, want_ret = gae_reference(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert torch.allclose(adv[b, :n], torch.tensor(want_adv), atol=1e-5)
        assert torch.allclose(ret[b, :n], torch.tensor(want_ret), atol=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    whitened, ret2 = compute_gae_advantage_return(rewards, values, mask, gamma, lam, whiten=True)
    assert torch.equal(ret2, ret)  # returns come from the advantages before whitening
    real = whitened[mask.bool()]
    assert real.mean().abs().item() < 1e-5 and real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(whitened, masked_whiten(adv, mask))


def test_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    r = compute_token_rewards(torch.tensor([1.0, 0.5]), logp, ref, mask, beta=0.1)
    want = torch.tensor([[-0.05, 0.0, 0.05 + 1.0], [0.0, 0.1 + 0.5, 0.0]])
    assert torch.allclose(r, want, atol=1e-6)
    assert last_token_index(mask).tolist() == [2, 1]


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 2.0, 0.0]])
    old = torch.tensor([[0.0, 2.0, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, frac = compute_value_loss(values, old, returns, mask, clip=0.5)
    # token 0: V=1 clipped to 0.5: max(1, 0.25) = 1;  token 1: max(1, 1) = 1;  token 2 is padding
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    # token 0: V = 0.2 is 0.8 below V_old = 1.0, so clip(V) = 0.5: (0.5 - 0)^2 = 0.25 > (0.2 - 0)^2 = 0.04
    values = torch.tensor([[0.2, 2.0, 0.0]])
    old = torch.tensor([[1.0, 2.0, 0.0]])
    loss, frac = compute_value_loss(values, old, returns, mask, clip=0.5)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1) / 2) and frac.item() == pytest.approx(0.5)


def test_critic_values_start_at_zero_and_train(tiny_checkpoints):
    """Values start at 0, and the critic learns targets that depend on the tokens (+1 after an even token id,
    -1 after an odd one): no constant, so the value head's bias alone cannot fit them."""
    import model as M
    net, _ = M.load_model(tiny_checkpoints["qwen2"][0])
    critic = Critic(net)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    v = critic(ids)
    assert v.shape == (2, 9) and torch.equal(v, torch.zeros(2, 9))
    target = 1.0 - 2.0 * (ids % 2).float()
    best_constant = (target - target.mean()).square().mean().item()
    opt = torch.optim.AdamW(critic.parameters(), lr=1e-2)
    for _ in range(30):
        loss = (critic(ids) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert best_constant > 0.9 and loss.item() < 0.1 * best_constant


def test_group_values_are_the_critics_values_before_each_token(tiny_checkpoints):
    """group_values (two prompts whose shared prefix runs once, each prompt once, its completions sharing it)
    against the critic's plain forward over prompt + completion: V[:, t] is the value at the position before
    completion token t; 0 on padding."""
    import model as M
    net, _ = M.load_model(tiny_checkpoints["llama"][0])
    critic = Critic(net)
    with torch.no_grad():
        critic.value_head.weight.normal_(generator=torch.Generator().manual_seed(1))
        critic.value_head.bias.fill_(0.3)
    system = list(range(120, 140))  # 20 tokens: a shared prefix of its own (losspass.SHARED_PREFIX_MIN)
    prompts = [system + [5, 17, 42, 99, 3], system + [61]]
    groups = [[[64, 200, 7], [11], [250, 8]], [[9, 9], [31]]]
    values = critic.group_values(prompts, groups, checkpoint=False)
    assert [v.shape for v in values] == [(3, 3), (2, 2)]
    for prompt, completions, got in zip(prompts, groups, values):
        T = got.shape[1]
        for i, c in enumerate(completions):
            plain = critic(torch.tensor([prompt + c]))[0]  # [P + T]
            want = plain[len(prompt) - 1:len(prompt) - 1 + len(c)]
            torch.testing.assert_close(got[i, :len(c)], want, atol=1e-5, rtol=1e-5)
            assert torch.equal(got[i, len(c):], torch.zeros(T - len(c)))
