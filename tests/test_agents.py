"""agents.py: the Memory Manager's environment on a hand-written conversation, and training runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

import agents
import manager
import model as M
import train
from data.locomo import Conversation, Question, Session, Turn
from memory import FactRecord, HashEmbedder, MemoryBank
from prompts import answer_messages
from sampling import generate

DATE = "1:00 pm on 8 May, 2023"
TURNS = [("D1:1", "Melanie", "I adopted a dog named Buddy!", "Melanie adopted a dog named Buddy"),
         ("D1:2", "Caroline", "Aww, I love dogs.", "Caroline loves dogs"),
         ("D1:3", "Melanie", "We adopted a second dog today, Scout.", "Melanie adopted another dog named Scout"),
         ("D1:4", "Melanie", "We moved to Boston last month.", "Melanie lives in Boston"),
         ("D1:5", "Melanie", "Correction: we never moved, we still live in Denver.",
          "Melanie lives in Denver, not Boston")]


@pytest.fixture(scope="module")
def conversation():
    turns = [Turn(d, s, text, 1, None) for d, s, text, _ in TURNS]
    conv = Conversation("conv-hand", "Caroline", "Melanie", [Session(1, None, DATE, turns)], [], [])
    facts = [FactRecord(s, fact, [d], DATE) for d, s, _, fact in TURNS]
    questions = [Question("How many dogs did Melanie adopt?", "two", 1, ["D1:1", "D1:3"], "conv-hand", 0),
                 Question("Which city does Melanie live in?", "Denver", 1, ["D1:5"], "conv-hand", 1)]
    return conv, facts, questions


def event(mid, text, op, old=None):
    return {"id": mid, "text": text, "event": op, **({"old_memory": old} if old else {})}


def reply(*events):
    return json.dumps({"memory": list(events)})


def test_examples_are_evidence_turns_with_window_banks_and_renamed_ids(conversation, tiny_checkpoints):
    conv, facts, questions = conversation
    _, tok = M.load_model(tiny_checkpoints["llama"][0])
    examples = agents.manager_examples(conv, questions, facts, tok, HashEmbedder(), window=24, k=5)
    # the evidence turns (D1:1 starts from empty banks); D1:2 and D1:4 are no question's evidence
    assert [ex.meta["dia_id"] for ex in examples] == ["D1:1", "D1:3", "D1:5"]
    ex = examples[2]
    assert [q.answer for q in ex.meta["questions"]] == ["Denver"]
    bank = ex.meta["banks"]["Melanie"]
    assert sorted(m.text for m in bank.memories.values()) == sorted(
        ["Melanie adopted a dog named Buddy", "Melanie adopted another dog named Scout", "Melanie lives in Boston"])
    assert len(ex.meta["banks"]["Caroline"]) == 1
    assert sorted(ex.meta["id_map"]) == ["0", "1", "2"] and sorted(ex.meta["id_map"].values()) == sorted(bank.memories)
    assert '"id": "0"' in tok.decode(ex.prompt) and "Melanie lives in Denver, not Boston" in tok.decode(ex.prompt)
    # a window of 1 turn keeps only D1:4's fact
    small = agents.manager_examples(conv, questions, facts, tok, HashEmbedder(), window=1, k=5)[2]
    assert [m.text for m in small.meta["banks"]["Melanie"].memories.values()] == ["Melanie lives in Boston"]


def test_add_update_and_delete_edit_a_copy_of_the_bank(conversation, tiny_checkpoints):
    conv, facts, questions = conversation
    _, tok = M.load_model(tiny_checkpoints["llama"][0])
    ex1, ex3, ex5 = agents.manager_examples(conv, questions, facts, tok, HashEmbedder())
    bank, id_map = ex3.meta["banks"]["Melanie"], ex3.meta["id_map"]
    assert id_map == {"0": "0"}  # one memory shown, Buddy

    merged, counts = manager.apply_output(bank, reply(event("0", "Melanie adopted two dogs, Buddy and Scout",
                                                             "UPDATE", "Melanie adopted a dog named Buddy")),
                                          id_map, ex3.meta["facts"])
    assert [m.text for m in merged.memories.values()] == ["Melanie adopted two dogs, Buddy and Scout"]
    assert counts["UPDATE"] == 1 and counts["parse_fail"] == 0
    assert [m.text for m in bank.memories.values()] == ["Melanie adopted a dog named Buddy"]  # untouched

    added, counts = manager.apply_output(bank, reply(event("0", "Melanie adopted a dog named Buddy", "NONE"),
                                                     event("1", "Melanie adopted a dog named Scout", "ADD")),
                                         id_map, ex3.meta["facts"])
    assert len(added) == 2 and counts["ADD"] == 1 and counts["NONE"] == 1
    new = [m for m in added.memories.values() if "Scout" in m.text][0]
    assert new.dia_ids == ["D1:3"] and new.speaker == "Melanie" and new.timestamp == DATE

    bank5, map5 = ex5.meta["banks"]["Melanie"], ex5.meta["id_map"]
    boston = next(shown for shown, real in map5.items() if bank5.memories[real].text == "Melanie lives in Boston")
    fixed, counts = manager.apply_output(bank5, reply(event(boston, "Melanie lives in Boston", "DELETE"),
                                                      event("9", "Melanie lives in Denver", "ADD")),
                                         map5, ex5.meta["facts"])
    assert "Melanie lives in Boston" not in [m.text for m in fixed.memories.values()]
    assert "Melanie lives in Denver" in [m.text for m in fixed.memories.values()] and len(fixed) == 3

    for junk in ("I think we should add it", "", None):
        same, counts = manager.apply_output(bank5, junk, map5, ex5.meta["facts"])
        assert counts["parse_fail"] == 1 and not counts["recovered"] and len(same) == len(bank5)
    cut_off = '{"memory": [{"id": "5", "text": "x", "event": "UPDATE"}, {"id": "0", "te'
    cut, counts = manager.apply_output(bank5, cut_off, map5, ex5.meta["facts"])
    # both events are invalid (an unknown id; an event cut off before its type) and nothing changes
    assert counts["invalid"] == 2 and counts["parse_fail"] == 1 and counts["recovered"] and len(cut) == len(bank5)


def test_reward_is_the_frozen_answerers_score_on_the_edited_bank(conversation, smollm2_path):
    """A real model (SmolLM2) answers; the reward must equal scoring its answer from a bank built by hand."""
    conv, facts, questions = conversation
    answerer, tok = M.load_model(smollm2_path)
    args = train.parse_args(["--agent", "manager", "--preset", "cpu", "--reward", "f1", "--memories-per-speaker", "3"],
                            settings=dict(answer_max_new_tokens=24, manager_format="mem0"))
    ex3 = agents.manager_examples(conv, questions, facts, tok, HashEmbedder())[1]
    merge = reply(event("0", "Melanie adopted two dogs, Buddy and Scout", "UPDATE"))
    rows = agents.manager_score(ex3, [merge, "no json here"], answerer, tok, args)

    by_hand = {"Melanie": MemoryBank(), "Caroline": MemoryBank()}
    by_hand["Melanie"].add("Melanie adopted two dogs, Buddy and Scout", timestamp=DATE)
    by_hand["Caroline"].add("Caroline loves dogs", timestamp=DATE)
    want = []
    for q in questions[:1]:
        msgs = answer_messages(q.question, "Caroline", by_hand["Caroline"].search(q.question, 3),
                               "Melanie", by_hand["Melanie"].search(q.question, 3))
        out = generate(answerer, [tok.chat(msgs)], 24, temperature=0)[0]
        want.append(agents.score_answer(tok.decode(out), q.answer, "f1", False))
    assert want[0]["reward"] > 0  # SmolLM2 answers "two" in some words: F1 1/6 here, so a constant 0 cannot pass
    assert rows[0]["reward"] == pytest.approx(want[0]["reward"]) and rows[0]["f1"] == pytest.approx(want[0]["f1"])
    assert rows[0]["update"] == 1.0 and rows[0]["bank_size"] == 1.0 and rows[0]["parse_fail"] == 0.0
    assert rows[1] == {"reward": 0.0, "em": 0.0, "f1": 0.0, "parse_fail": 1.0, "add": 0.0, "update": 0.0,
                       "delete": 0.0, "none": 0.0, "invalid_events": 0.0, "bank_size": 1.0, "dec_add": 0.0,
                       "dec_update": 0.0, "dec_delete": 0.0, "dec_none": 1.0, "dec_mixed": 0.0}


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_manager_training_writes_metrics_and_checkpoint_and_resumes(algo, tiny_checkpoints, tmp_path):
    """LoCoMo's training conversation, a tiny random manager and answerer: every output is malformed, and
    every step still completes, counts the failures and checkpoints; a run killed after step 1 and resumed
    ends bit for bit where an unbroken run does."""
    ckpt = tiny_checkpoints["qwen2"][0]
    common = ["--agent", "manager", "--data", "locomo", "--reward", "em", "--embedder", "hash",
              "--algo", algo, "--model", ckpt, "--max-new-tokens", 12, "--group-size", 2, "--questions-per-step", 1,
              "--lr", 1e-3, "--memories-per-speaker", 1, "--val-limit", 1, "--save-every", 1, "--val-every", 1]
    # GRPO here also runs plain SGD (a setting, not a flag) and another loss aggregation, saved and resumed
    common += ["--loss-agg", "seq-mean-token-sum"] * (algo == "grpo")
    settings = dict(manager_format="mem0", answer_max_new_tokens=3, window=4,
                    optimizer="sgd" if algo == "grpo" else "adamw")
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    def parse(*extra):
        return train.parse_args([str(x) for x in common + list(extra)], settings=settings)
    train.run(parse("--out", killed, "--steps", 1))
    train.run(parse("--out", killed, "--steps", 2, "--resume"))
    train.run(parse("--out", straight, "--steps", 2))
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("add", "update", "delete", "none", "invalid_events", "parse_fail", "bank_size", "reward"):
        assert key in rows[1] and f"val_{key}" in rows[2], key
    assert rows[1]["parse_fail"] == 1.0
    state = json.loads((killed / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["args"]["agent"] == "manager"
    assert {p.suffix for p in (killed / "checkpoint").iterdir()} == {".json", ".safetensors"}  # no pickle

    names = ["model.safetensors", "optimizer.safetensors"] + ["critic.safetensors"] * (algo == "ppo")
    for name in names:
        a, b = load_file(straight / "checkpoint" / name), load_file(killed / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    if algo == "ppo":  # it did train: PPO's critic and whitened advantages move the policy even at reward 0
        start, moved = load_file(ckpt / "model.safetensors"), load_file(killed / "checkpoint" / "model.safetensors")
        assert any(not torch.equal(moved[k], start[k]) for k in start)
    # GRPO: no output of a random manager parses, so every reward is 0 and, at the start, so is the KL
    # gradient: nothing to learn. What the comparison checks there is that the resumed run samples the same.
    # logp_mismatch is the sampler's rounding against the loss pass's (~3e-7 a token), not the run's state: on
    # an Intel Xeon with AMX it differed in the 7th digit between two fresh processes (2.4e-7 and 3.4e-7) while
    # the tokens, the rewards and every weight were identical; it is compared to a tolerance. peak_rss_gb is
    # the test process's own peak so far (both runs share it), not the run's.
    drop = {"seconds", "rollout_s", "update_s", "sync_s", "logp_mismatch", "peak_rss_gb"}
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in straight_rows]
    for r, s in zip(rows, straight_rows):
        assert ("logp_mismatch" in r) == ("logp_mismatch" in s) and abs(r.get("logp_mismatch", 0) -
                                                                       s.get("logp_mismatch", 0)) < 1e-5
