"""The manager's decision head (decision.py): its offset, its loss's gradient, and greedy decoding under it."""

import torch

import decision
import model as M
import prompts as P
from grammar import allowed_masks
from sampling import generate

SHOWN = [{"id": "0", "text": "Bruno drives a BMW"}, {"id": "1", "text": "Bruno has a dog named Rocky"}]
FACTS = ["Bruno sold the BMW and now drives a Subaru"]


def test_the_offset_is_standardised_and_averages_zero_over_the_states_it_was_fit_on():
    """s(h) = w . (h - mean) / std by hand; over the fitting states it sums to 0 whatever w is: the head has no
    push shared by every state (its reason to exist, decision.py)."""
    h = torch.tensor([[1.0, 2.0], [3.0, 6.0], [2.0, 1.0]])
    head = decision.DecisionHead(2)
    head.fit(h)
    sd = torch.tensor([1.0, 2.6457513])  # sample standard deviations of the columns (n - 1)
    sd = sd + 1e-3 * sd.mean()
    with torch.no_grad():
        head.w.copy_(torch.tensor([0.5, -2.0]))
    x = (h - torch.tensor([2.0, 3.0])) / sd
    assert torch.allclose(head(h), x @ torch.tensor([0.5, -2.0]), atol=1e-5)
    assert abs(head(h).sum().item()) < 1e-5


def test_the_head_loss_is_the_exact_gradient_of_the_expected_reward():
    """One state, both arms tried (G = 2), rewards R_new = 0.7, R_memory = 0.2: the all-arms advantages make
    grad_w of head_loss equal -grad_w V / std_w, V = P(new) R_new + (1 - P(new)) R_memory, std_w the arms'
    spread under the policy (decision.all_arms_advantage), with V's gradient from autograd."""
    torch.manual_seed(0)
    head = decision.DecisionHead(3)
    head.fit(torch.randn(5, 3))
    with torch.no_grad():
        head.w.copy_(torch.tensor([0.3, -0.1, 0.4]))
    L, h = torch.tensor(-0.8), torch.randn(3)
    arms, rewards = torch.tensor([0, 1]), torch.tensor([0.7, 0.2])
    logp = decision.arm_logp(head, L.expand(2), h.expand(2, -1), arms).detach()
    adv = decision.all_arms_advantage(rewards, arms, logp, 2, scale=True, eps=0.0)
    decision.head_loss(head, [(L, h)], [arms], [adv]).backward()
    got = head.w.grad.clone()

    head.w.grad = None
    p = torch.sigmoid(L + head(h[None])[0])
    value = p * 0.7 + (1 - p) * 0.2
    value.backward()
    spread = (p * (1 - p)).sqrt().detach() * 0.5
    assert torch.allclose(got, -head.w.grad / spread, atol=1e-5)
    assert decision.head_loss(head, [None], [torch.zeros(2, dtype=torch.long)], [adv]).item() == 0  # nothing shown


def test_the_slot_log_odds_are_the_loss_pass_arm_probabilities_and_greedy_follows_the_head(smollm2_path, tmp_path):
    """On the real SmolLM2: L at the first decision slot equals log P(new) - log P(a memory) read from the loss
    pass over samples given each arm (another code path); a head that pushes the state towards "new" makes greedy
    decoding ADD the fact, one that pushes away names a memory; the head survives a save and a load."""
    net, tok = M.load_model(smollm2_path)
    V, marker = net.lm_head.weight.shape[0], P.decision_marker(tok)
    g = P.manager_ops_automaton(tuple(m["text"] for m in SHOWN), 1).guide(tok, V)
    prompt = tok.chat(P.manager_messages(SHOWN, FACTS, "ops"))
    other = tok.chat(P.manager_messages(SHOWN[::-1], FACTS, "ops"))
    guides, arms = decision.arm_guides(g, marker, 2)
    slot = decision.first_decision(g, marker)[1]
    comps, logps = generate(net, [prompt] * 2, 64, 1.0, seed=0, return_logprobs=True, guide=guides)
    lp, _ = net.logprobs(prompt, comps, 1.0, False, allowed_masks(comps, V, g))
    arm_logp = lp[:, slot] - torch.tensor([row[slot] for row in logps])  # [2]: log P("new"), log P(a memory)
    (L, h), = decision.states_at_slots(net, [type("Ex", (), {"prompt": prompt, "guide": g})], marker)
    assert abs(L.item() - (arm_logp[0] - arm_logp[1]).item()) < 1e-3

    g2 = P.manager_ops_automaton(tuple(m["text"] for m in SHOWN[::-1]), 1).guide(tok, V)
    both = decision.slot_states(net, [decision.slot(prompt, g, marker), decision.slot(other, g2, marker)])
    alone = decision.slot_states(net, [decision.slot(other, g2, marker)])  # no shared prefix, no cache reuse
    assert torch.allclose(both[0][1], alone[0][0], atol=1e-4) and torch.allclose(both[1][1], alone[1][0], atol=1e-4)
    decision.attach(net, None, [type("Ex", (), {"prompt": p, "guide": x}) for p, x in ((prompt, g), (other, g2))],
                    marker)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["decision_head.w"]  # the network frozen
    x = (h - net.decision_head.mean) / net.decision_head.std
    for sign, adds in ((1, True), (-1, False)):
        with torch.no_grad():
            net.decision_head.w.copy_(sign * 50 * x / x.square().sum())  # s(h) = +-50
        chosen = decision.greedy_guides(net, [prompt], [g], marker)
        out = generate(net, [prompt], 64, temperature=0, guide=chosen)[0]
        parsed = P.parse_manager_ops(tok.decode(out), FACTS, SHOWN)
        assert parsed.ok and (parsed.value[0]["event"] == "ADD") == adds, tok.decode(out)
    decision.save_head(net, tmp_path)
    fresh = type("Net", (), {"lm_head": net.lm_head})()  # what load_head needs of a model: its device
    assert decision.load_head(fresh, tmp_path) and not decision.load_head(fresh, tmp_path / "nowhere")
    for k, v in net.decision_head.state_dict().items():
        assert torch.equal(fresh.decision_head.state_dict()[k], v)


def test_a_decision_head_run_trains_the_head_alone_and_resumes(smollm2_path, tmp_path, monkeypatch, one_ops_demo):
    """train.py --decision-head on the gym's ops format, the real SmolLM2 as manager and answerer: the network's
    weights stay those it started from, the head moves, its P(new) is logged, and a run killed after step 1 and
    resumed ends bit for bit where an unbroken run does (head, metrics)."""
    import json

    from safetensors.torch import load_file

    import train
    monkeypatch.setattr(decision, "FIT_STATES", 4)  # the normaliser from 4 states: the test's time is elsewhere
    common = ["--agent", "manager", "--data", "gym", "--reward", "prob", "--embedder", "hash", "--model", smollm2_path,
              "--answerer", smollm2_path, "--max-new-tokens", 48, "--group-size", 2, "--questions-per-step", 2,
              "--memories-per-speaker", 1, "--val-limit", 1, "--save-every", 1, "--val-every", 1,
              "--dynamic-sampling", 0, "--decision-head"]
    settings = dict(answer_max_new_tokens=3, manager_k=2)
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    def run(out, *extra):
        train.run(train.parse_args([str(x) for x in common + ["--out", out, *extra]], settings=settings))
    run(killed, "--steps", 1)
    run(killed, "--steps", 2, "--resume")
    run(straight, "--steps", 2)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(0 < r["arm_p_new"] < 1 for r in rows[1:])
    a, b = load_file(straight / "checkpoint" / decision.FILE), load_file(killed / "checkpoint" / decision.FILE)
    assert a.keys() == b.keys() == {"w", "mean", "std"} and all(torch.equal(a[k], b[k]) for k in a)
    drop = {"seconds", "rollout_s", "update_s", "peak_rss_gb"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop}
            for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())]
    assert a["w"].norm() > 0 or all(r["zero_std_groups"] == 1.0 for r in rows[1:])  # it trained, unless all tied
    net, _ = M.load_model(smollm2_path)
    saved = load_file(killed / "checkpoint" / "model.safetensors")
    names = {v: k for k, v in net.hf_names().items()}
    assert all(torch.equal(t, net.state_dict()[names[k]]) for k, t in saved.items())  # the network is frozen


def test_the_decision_head_brings_its_recipe_and_explicit_flags_win():
    """--decision-head sets the recipe of flags.DECISION_HEAD (no reference, SGD at 0.5, balanced states, 24 x 2 with
    the rest written greedily, one memory shown); a flag given wins; without it the cpu preset's manager column is
    as before; a reference, or the answer agent, is refused."""
    import pytest

    import train
    a = train.parse_args(["--agent", "manager", "--preset", "cpu", "--decision-head"])
    assert (a.balance_kinds, a.beta, a.optimizer, a.lr, a.questions_per_step, a.group_size, a.temperature,
            a.dynamic_sampling, a.manager_k) == (True, 0.0, "sgd", 0.5, 24, 2, 0.0, 0, 1)
    assert train.parse_args(["--agent", "manager", "--preset", "cpu", "--decision-head", "--lr", "0.1"]).lr == 0.1
    b = train.parse_args(["--agent", "manager", "--preset", "cpu"])
    assert (b.decision_head, b.balance_kinds, b.beta, b.optimizer, b.lr, b.manager_k) == (False, False, 0.01, "adamw", 5e-6, 2)
    for bad in (["--agent", "manager", "--decision-head", "--beta", "0.01"], ["--decision-head"]):
        with pytest.raises(SystemExit):  # the network is frozen: a KL to a reference has nothing to hold
            train.parse_args(["--preset", "cpu", *bad])
