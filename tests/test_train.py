"""train.py: reward, question order, optimizer state, learning, metrics, checkpoints and exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

import agents
import checkpoint
import model as M
import train

WORDS = ["cab", "bead", "dice", "face", "aced", "deaf", "bad", "cafe"]


def repeat_task(tok) -> agents.Task:
    """A task with a computable reward: the share of output characters that belong to the prompt's word."""
    def example(word):
        return agents.Example(tok.chat([{"role": "user", "content": f"Repeat: {word}"}]), word)

    def score(ex, texts):
        return [{"reward": sum(ch in ex.gold for ch in t) / max(len(t), 1)} for t in texts]

    return agents.Task([example(w) for w in WORDS], [example(w) for w in WORDS[:4]], score)


def flags(ckpt, out, *extra, **settings):
    """train.py's flags over the cpu preset; `settings` replaces flags.SETTINGS / preset values (not flags)."""
    return train.parse_args(["--model", str(ckpt), "--out", str(out), "--preset", "cpu", "--data", "locomo",
                             *map(str, extra)], settings=settings)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_score_answer_is_exact_match_after_the_marker():
    text = "**Memories selected as relevant:**\n- 7 May 2023: Caroline went to a support group\n**Answer:** The beach."
    # EM drops "the" and the full stop (SQuAD); Mem0's F1 keeps "the": tokens {the, beach} vs {beach}
    assert agents.score_answer(text, "beach") == {"reward": 1.0, "em": 1.0, "f1": 2 / 3, "parse_fail": 0.0}
    s = agents.score_answer("**Answer:** sunny beach", "the beach", reward="f1")
    assert s["em"] == 0.0 and s["reward"] == pytest.approx(0.5)  # {sunny, beach} vs {the, beach}
    # F1 is over token sets: a date in another order scores 1, EM 0 (why the cpu preset turns to EM at step 16)
    assert agents.score_answer("**Answer:** December 30, 2023", "30 December 2023", reward="f1") == {
        "reward": 1.0, "em": 0.0, "f1": 1.0, "parse_fail": 0.0}
    # no marker: the paper scores 0; the lenient mode scores the first line and still counts the failure
    assert agents.score_answer("beach\nmore", "beach")["reward"] == 0.0
    assert agents.score_answer("beach\nmore", "beach", require_marker=False) == {
        "reward": 1.0, "em": 1.0, "f1": 1.0, "parse_fail": 1.0}


def test_the_reward_turns_to_exact_match_from_step_em_from_also_after_a_resume(tiny_checkpoints, tmp_path):
    """The cpu preset scores the answerer's first 16 steps with F1, the later ones with EM (flags.PRESETS); the
    answer task's score reads args.reward, so a run resumed past that step scores with EM too."""
    assert [train.parse_args(["--agent", a, "--preset", "cpu"]).em_from for a in ("answer", "manager")] == [16, 0]
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)

    def run(out, steps, *extra):
        args = flags(ckpt, out, "--steps", steps, "--max-new-tokens", 3, "--group-size", 2, "--questions-per-step",
                     2, "--val-every", 3, "--val-limit", 1, "--save-every", 1, *extra, em_from=2)
        task, seen = repeat_task(tok), []
        score = task.score
        task.score = lambda ex, texts: seen.append(args.reward) or score(ex, texts)  # the name each call saw
        train.run(args, task)
        return seen

    # validation (1 prompt) at step 0, steps 1 and 2 (2 prompts each), step 3 and its validation
    assert run(tmp_path / "a", 3) == ["f1"] * 5 + ["em"] * 3
    assert run(tmp_path / "b", 2) == ["f1"] * 6  # and its last validation
    assert run(tmp_path / "b", 3, "--resume") == ["em"] * 3


def test_step_examples_take_each_question_once_per_epoch(tiny_checkpoints):
    task = agents.Task(list(range(10)), [], None)
    args = flags(tiny_checkpoints["llama"][0], "unused", "--questions-per-step", 3)
    seen = [x for step in range(10) for x in train.step_examples(task, step, args)]  # 30 = three epochs
    assert [sorted(seen[i:i + 10]) for i in (0, 10, 20)] == [list(range(10))] * 3
    assert seen[:10] != seen[10:20]  # reshuffled each epoch
    assert train.step_examples(task, 4, args) == seen[12:15]  # a function of the step alone (resume)


def test_aggregation_denominators_cover_the_whole_minibatch():
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1]])]
    assert train.agg_denominator("token-mean", masks, 8) == 6
    assert train.agg_denominator("seq-mean-token-mean", masks, 8) == 3
    assert train.agg_denominator("seq-mean-token-sum", masks, 8) == 3
    assert train.agg_denominator("seq-mean-token-sum-norm", masks, 8) == 24


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save_optimizer(opt.state_dict(), tmp_path / "opt.safetensors")
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1.0)
    checkpoint.load_optimizer(opt2, tmp_path / "opt.safetensors")
    assert opt2.param_groups[0]["lr"] == 1e-2 and opt2.param_groups[0]["weight_decay"] == 0.1
    x = torch.randn(5, 4)
    for n, o in ((net, opt), (twin, opt2)):
        n(x).square().sum().backward()
        o.step()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="but this run has SGD with .4.: resume with"):  # another optimizer
        checkpoint.load_optimizer(torch.optim.SGD(twin.parameters(), lr=1.0), tmp_path / "opt.safetensors")
    groups = [{"params": list(twin[0].parameters())}, {"params": list(twin[1].parameters()), "lr": 0.1}]
    with pytest.raises(ValueError, match=r"AdamW with parameter groups of \[4\] tensors, but this run has AdamW with \[2, 2\]"):  # other groups
        checkpoint.load_optimizer(torch.optim.AdamW(groups, lr=1.0), tmp_path / "opt.safetensors")


def test_grpo_raises_the_reward_of_a_computable_task(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["qwen2"][0]
    _, tok = M.load_model(ckpt)
    args = flags(ckpt, tmp_path, "--steps", 30, "--lr", 2e-3, "--max-new-tokens", 6, "--group-size", 8,
                 "--questions-per-step", 4, "--beta", 0, "--val-every", 30, "--save-every", 30)
    train.run(args, repeat_task(tok))
    rewards = [r["reward"] for r in read_metrics(tmp_path) if "reward" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 30
    assert last > 3 * first and last > first + 0.2, rewards
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # every run draws its curves


def test_grpo_resume_continues_exactly_where_the_run_stopped(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    common = ("--lr", 2e-3, "--max-new-tokens", 5, "--group-size", 4, "--questions-per-step", 2,
              "--beta", 0.05, "--val-every", 2, "--save-every", 2, "--minibatches", 2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.run(flags(ckpt, straight, "--steps", 4, *common), repeat_task(tok))
    train.run(flags(ckpt, killed, "--steps", 2, *common), repeat_task(tok))
    with (killed / "metrics.jsonl").open("a") as f:  # a line the killed run wrote after its last checkpoint
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        train.run(flags(ckpt, killed, "--steps", 4, *common), repeat_task(tok))
    train.run(flags(ckpt, killed, "--steps", 4, "--resume", *common), repeat_task(tok))

    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(straight / "checkpoint" / name), load_file(killed / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(load_file(straight / "checkpoint" / "model.safetensors")["lm_head.weight"],
                           load_file(ckpt / "model.safetensors")["lm_head.weight"])  # it did train
    # peak_rss_gb is this test process's own peak so far (the runs share the process), not the run's state
    drop = {"seconds", "rollout_s", "update_s", "sync_s", "peak_rss_gb"}
    a, b = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    for key in ("reward", "reward_std", "zero_std_groups", "kl", "clip_frac", "response_len", "truncated",
                "grad_norm", "val_reward"):
        assert key in a[2], key
    assert json.loads((killed / "checkpoint" / "trainer_state.json").read_text())["step"] == 4


def test_ppo_trains_the_answer_agent_on_locomo_and_resumes(tiny_checkpoints, tmp_path):
    """The real Answer Agent data (LoCoMo banks, the distillation prompt) and PPO with a critic, two epochs
    of two minibatches; a tiny random model writes no **Answer:**, so every output is a counted parse failure."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoints["qwen3"][0]
    common = ("--algo", "ppo", "--memories-per-speaker", 1, "--max-new-tokens", 4, "--group-size", 2,
              "--questions-per-step", 2, "--ppo-epochs", 2, "--minibatches", 2, "--val-limit", 2,
              "--val-every", 1, "--save-every", 1, "--lr", 1e-3, "--critic-lr", 1e-3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.run(flags(ckpt, straight, "--steps", 2, *common, guided=False))
    train.run(flags(ckpt, killed, "--steps", 1, *common, guided=False))
    train.run(flags(ckpt, killed, "--steps", 2, "--resume", *common, guided=False))
    for name in ("model.safetensors", "optimizer.safetensors", "critic.safetensors", "critic_optimizer.safetensors"):
        a, b = load_file(straight / "checkpoint" / name), load_file(killed / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["parse_fail"] == 1.0 and rows[1]["reward"] == 0.0 and rows[2]["val_parse_fail"] == 1.0
    for key in ("kl", "value_loss", "value_clip_frac", "clip_frac", "grad_norm", "value_grad_norm"):
        assert key in rows[1], key
    assert rows[2]["grad_norm"] > 0  # the KL penalty alone gives PPO a signal once the policy moved

    hf = AutoModelForCausalLM.from_pretrained(killed / "checkpoint", dtype=torch.float32).eval()
    ours, _ = M.load_model(killed / "checkpoint")
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_a_crash_between_the_renames_leaves_the_old_checkpoint_found(tmp_path):
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "trainer_state.json").write_text('{"step": 3}')
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.json").write_text('{"step": 4}')
    assert checkpoint.find_checkpoint(tmp_path) == tmp_path / "checkpoint"


def test_bad_flags_are_refused_with_the_reason(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "grpo", "--group-size", "1"])
    assert "--group-size must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "dpo"])
    assert "invalid choice: 'dpo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--agent", "answer", "--reward", "prob"])
    assert "--reward prob scores a manager" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--agent", "answer", "--decision-head"])
    assert "--decision-head trains a head on the manager's ops format alone" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a removed flag is an unknown one
        train.parse_args(["--head-lr-scale", "0.1"])
    assert "unrecognized arguments: --head-lr-scale" in capsys.readouterr().err


def test_answer_agent_banks_built_by_a_manager_checkpoint(tiny_checkpoints, tmp_path, monkeypatch,
                                                         first_sessions_only):
    """Phase two of the recipe: --manager CKPT runs that manager over the conversations' facts (cut to
    their first session here to keep the test short) and the Answer Agent trains on its banks: every
    prompt is rebuilt here from the banks run_managers returned (and those differ from add-all banks)."""
    from data.locomo import load_split
    from memory import add_all_banks, speaker_memories
    from prompts import answer_messages

    built, tasks = {}, []
    real_run_managers, real_answer_task = agents.run_managers, train.answer_task
    monkeypatch.setattr(agents, "run_managers", lambda convs, *a, **k: [
        built.setdefault(c.sample_id, (c, b))[1] for c, b in zip(convs, real_run_managers(convs, *a, **k))])
    monkeypatch.setattr(train, "answer_task", lambda *a, **k: tasks.append(real_answer_task(*a, **k)) or tasks[-1])
    ckpt = tiny_checkpoints["qwen2"][0]
    args = flags(ckpt, tmp_path, "--manager", ckpt, "--memories-per-speaker", 1, "--distill", "--max-new-tokens", 4,
                 "--group-size", 2, "--questions-per-step", 1, "--steps", 1, "--val-limit", 1, manager_max_new_tokens=6)
    train.run(args)
    assert list(built) == ["conv-26", "conv-30"]  # the train and val conversations, once each
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]

    _, tok = M.load_model(ckpt)
    differs = 0
    for split, examples in (("train", tasks[0].train), ("val", tasks[0].val)):
        questions = load_split(split)
        assert len(examples) == len(questions)
        for q, ex in zip(questions, examples):
            conv, banks = built[q.conv_id]
            prompts = []
            for bank in (banks, add_all_banks(conv, agents.conversation_facts(conv, "observation"))):
                mems_a, mems_b = speaker_memories(conv, bank, q.question, 1)
                prompts.append(tok.chat(answer_messages(q.question, conv.speaker_a, mems_a, conv.speaker_b, mems_b)))
            assert ex.prompt == prompts[0] and ex.gold == q.answer
            differs += prompts[1] != prompts[0]
    assert differs > 0


def test_the_run_ends_with_held_out_figures_and_their_standard_errors(tmp_path):
    from metrics import standard_error
    assert standard_error([1.0, 0.0, 0.0, 1.0]) == pytest.approx((1 / 3 / 4) ** 0.5)  # sample sd / sqrt(n)
    assert standard_error([0.5]) == 0.0
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "val_reward": 0.1, "val_reward_se": 0.02, "val_em": 0.0, "val_em_se": 0.0, "val_n": 64},
            {"step": 1, "reward": 0.3}, {"step": 2, "val_reward": 0.45, "val_reward_se": 0.05, "val_em": 0.25,
                                         "val_em_se": 0.054, "val_n": 64}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = train.held_out_summary(log)
    assert "validation on 64 held-out prompts" in text
    assert "reward step 0: 0.100 +- 0.020   step 2: 0.450 +- 0.050   change +0.350" in text
    assert "em     step 0: 0.000 +- 0.000   step 2: 0.250 +- 0.054   change +0.250" in text
    # the answerer's log has F1 beside the reward, which may have turned to EM: F1 and EM are shown
    for r in rows[::2]:
        r.update(val_f1=r["val_reward"] + 0.1, val_f1_se=0.01)
    rows[2]["val_reward"] = rows[2]["val_em"]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = train.held_out_summary(log)
    assert "f1     step 0: 0.200 +- 0.010   step 2: 0.550 +- 0.010   change +0.350" in text and "reward" not in text


def test_dynamic_sampling_fills_the_step_and_resumes_exactly(tiny_checkpoints, tmp_path, monkeypatch):
    """--dynamic-sampling: groups whose rewards are all equal (here: every prompt of the first half of WORDS
    scores a constant) are set aside and more prompts sampled, every step keeps questions_per_step groups,
    and a killed run resumes on the very prompts and samples of an unbroken one."""
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    task = repeat_task(tok)
    flat = set(WORDS[:4])
    score = task.score
    task.score = lambda ex, texts: [{"reward": 0.5} for _ in texts] if ex.gold in flat else score(ex, texts)
    seen = []
    real_update = train.update
    common = ("--lr", 2e-3, "--max-new-tokens", 5, "--group-size", 4, "--questions-per-step", 2, "--beta", 0,
              "--val-every", 2, "--save-every", 2, "--dynamic-sampling", 2)

    def spy(policy, opt, groups, *a, **k):
        seen.append([len({s["reward"] for s in g.scores}) == 1 for g in groups])  # equal rewards: no signal
        return real_update(policy, opt, groups, *a, **k)

    monkeypatch.setattr(train, "update", spy)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.run(flags(ckpt, straight, "--steps", 4, *common), task)
    train.run(flags(ckpt, killed, "--steps", 2, *common), task)
    train.run(flags(ckpt, killed, "--steps", 4, "--resume", *common), task)
    assert all(len(step) == 2 for step in seen)  # the step's size, whatever was set aside
    a, b = read_metrics(straight), read_metrics(killed)
    for row, kept in zip(a[1:], seen[:4]):  # an equal-reward group is kept only when the rounds ran out
        informative = round(row["sampled_groups"] * (1 - row["sampled_zero_std_groups"]))
        assert sum(kept) == max(0, 2 - informative), (row, kept)
        assert row["sampled_groups"] == (6 if informative < 2 else row["sampled_groups"])
    assert sum(r["sampled_groups"] for r in a[1:]) > 8  # some steps did sample more rounds
    # peak_rss_gb is this test process's own peak so far (the runs share the process), not the run's state
    drop = {"seconds", "rollout_s", "update_s", "sync_s", "peak_rss_gb"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in b]
    assert all(r["sampled_groups"] >= 2 for r in a[1:])
    assert len(train.step_examples(task, 1, flags(ckpt, "unused", *common))) == 6  # (1 + 2 rounds) x 2 prompts


def test_the_reference_holds_no_decoding_copy_and_metrics_log_peak_memory(tiny_checkpoints, tmp_path):
    import engine
    ckpt = tiny_checkpoints["llama"][0]
    args = flags(ckpt, tmp_path, "--beta", "0.01")
    base, _ = train.M.load_model(str(ckpt))
    policy, ref, _ = checkpoint.load_models(args, base, None)
    if not any(layer.packed is not None for layer in engine.layers_of(policy)):
        pytest.skip("no packed layout on this machine: nothing to drop")
    assert ref is not policy and all(layer.packed is None for layer in engine.layers_of(ref))
    peak = train.peak_rss_gb()
    assert 0.05 < peak < 1000  # GiB: a process with torch loaded holds more than 50 MB
