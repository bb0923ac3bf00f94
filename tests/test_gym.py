"""data/gym.py: deterministic conversations whose questions the oracle banks answer, and no stale memory."""

import hashlib
import json
import re

import pytest
import torch

import agents
import manager
from data import gym, locomo

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def conversations():
    return {split: gym.load_conversations(splits=(split,)) for split in SPLITS}


def test_the_generator_is_a_function_of_the_seed():
    a, b = gym.generate_conversation(3, "train"), gym.generate_conversation(3, "train")
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(gym.generate_conversation(4, "train"))
    assert json.dumps(a) != json.dumps(gym.generate_conversation(3, "val"))  # splits do not share seeds


def test_the_frozen_test_file_is_the_one_the_results_were_measured_on(tmp_path):
    digest = hashlib.sha256(gym.TEST_FILE.read_bytes()).hexdigest()
    assert digest == gym.TEST_SHA256
    edited = tmp_path / "gym_test.json"
    edited.write_bytes(gym.TEST_FILE.read_bytes().replace(b"Paris", b"Pariz", 1))
    with pytest.raises(locomo.DataError, match="is not the frozen test file's"):
        gym.load_conversations(edited, splits=("test",))
    with pytest.raises(locomo.DataError, match="frozen test file is missing"):
        gym.load_split("test", tmp_path / "absent.json")


def test_splits_have_every_category_and_the_locomo_types(conversations):
    for split in SPLITS:
        qs = gym.load_split(split)
        assert {q.category for q in qs} == set(gym.CATEGORY_LABELS), split
        assert all(isinstance(q, locomo.Question) and q.answer and q.evidence for q in qs)
        assert {q.conv_id for q in qs} == {c.sample_id for c in conversations[split]}
        assert len(conversations[split]) == gym.Level().conversations[split]
    ids = [c.sample_id for s in SPLITS for c in conversations[s]]
    assert len(ids) == len(set(ids))


# What the oracle's memories say, read back with the observation templates (independently of the generator's
# own state): person -> attribute -> value (single) or members (sets), and dates of the last change.
PATTERNS = [
    ("city", r"(?P<p>\w+) lives in (?P<v>\w+)"), ("city", r"(?P<p>\w+) moved from \w+ to (?P<v>\w+) on (?P<d>.+)"),
    ("job", r"(?P<p>\w+) works as a (?P<v>\w+)"),
    ("job", r"(?P<p>\w+) stopped working as a \w+ and started working as a (?P<v>\w+) on (?P<d>.+)"),
    ("car", r"(?P<p>\w+) drives a (?P<v>\w+)"), ("car", r"(?P<p>\w+) sold the \w+ and now drives a (?P<v>\w+)"),
    ("food", r"(?P<p>\w+)'s favourite food is (?P<v>\w+)"),
    ("food", r"(?P<p>\w+)'s favourite food is now (?P<v>\w+) instead of \w+"),
    ("dogs", r"(?P<p>\w+) has a dog named (?P<v>\w+)"), ("dogs", r"(?P<p>\w+) has dogs named (?P<v>.+)"),
    ("languages", r"(?P<p>\w+) speaks (?P<v>.+)"), ("hobbies", r"(?P<p>\w+) enjoys (?P<v>.+)"),
]
DISTRACTOR = re.compile(r"\w+'s (sister|best friend|neighbour|brother|cousin|roommate) ")


def read_back(banks) -> dict:
    state = {}
    for person, bank in banks.items():
        for mem in bank.memories.values():
            if DISTRACTOR.match(mem.text):
                continue
            found = [(attr, m) for attr, pat in PATTERNS if (m := re.fullmatch(pat, mem.text))]
            assert len(found) == 1, mem.text  # every memory is one attribute's fact
            attr, m = found[0]
            assert m["p"] == person and attr not in state.get(person, {}), f"stale or misfiled: {mem.text}"
            state.setdefault(person, {})[attr] = (m["v"], m.groupdict().get("d"))
    return state


def test_oracle_banks_answer_every_question_and_hold_no_stale_fact(conversations):
    """Applied in order, the oracle's events leave one memory per held attribute (read_back fails on a second
    one), and each question's gold answer is what that memory says."""
    n = 0
    for split in SPLITS:
        for conv in conversations[split]:
            state = read_back(manager.oracle_banks(conv))
            for qa in conv.qa:
                person = next(p for p in (conv.speaker_a, conv.speaker_b) if p in qa["question"])
                attr = next(a for a, q in {**gym.QUESTION}.items() if q.format(p=person) == qa["question"]) \
                    if qa["category"] not in (4, 5) else None
                if qa["category"] == 5:  # a retracted car: no car memory left
                    assert "car" not in state[person] and qa["answer"] == "No"
                elif qa["category"] == 4:  # "When did X move to V?": the date in the memory that says V
                    value, date = state[person]["city" if "move to" in qa["question"] else "job"]
                    assert qa["question"].endswith(f" {value}?") and date == qa["answer"]
                else:
                    assert state[person][attr][0] == qa["answer"], (qa, state[person])
                n += 1
    assert n == sum(len(gym.load_split(s)) for s in SPLITS)


def test_every_phrasing_family_words_every_kind_of_turn():
    for family, words in gym.FAMILIES.items():
        assert set(words["say"]) == set(gym.SAY) and set(words["observe"]) == set(gym.OBSERVE), family
        assert len(words["distract"]) == len(gym.DISTRACT), family
    assert set(gym.HELDOUT_FAMILIES) <= set(gym.FAMILIES) and 0 not in gym.HELDOUT_FAMILIES


def test_the_heldout_split_is_the_test_worlds_in_other_words(conversations):
    """Frozen like the test file; conversation i is test conversation i in a held-out family: the same questions,
    answers, evidence and oracle events (kinds and memory ids), no observation sentence in common, and each memory
    the oracle keeps for an attribute names the same value as the test split's memory of that id."""
    assert hashlib.sha256(gym.HELDOUT_FILE.read_bytes()).hexdigest() == gym.HELDOUT_SHA256
    assert json.dumps(gym.generate_split("heldout"), indent=1, ensure_ascii=False) + "\n" == \
        gym.HELDOUT_FILE.read_text()
    heldout = gym.load_conversations(splits=("heldout",))
    assert len(heldout) == len(conversations["test"]) and {q.category for q in gym.load_split("heldout")} == \
        set(gym.CATEGORY_LABELS)
    for new, old in zip(heldout, conversations["test"]):
        assert new.sample_id == old.sample_id.replace("-test-", "-heldout-") and new.qa == old.qa
        assert {d: [(e["event"], e["id"]) for e in k["events"]] for d, k in new.oracle.items()} == \
               {d: [(e["event"], e["id"]) for e in k["events"]] for d, k in old.oracle.items()}
        assert not {f.text for f in new.observations} & {f.text for f in old.observations}
        new_banks, old_banks = manager.oracle_banks(new), manager.oracle_banks(old)
        for person, values in read_back(old_banks).items():
            for mid, mem in old_banks[person].memories.items():
                text = new_banks[person].memories[mid].text
                if not DISTRACTOR.match(mem.text):
                    attr = next(a for a, (v, _) in values.items() if v in mem.text)
                    assert person in text and values[attr][0].lower() in text.lower(), (mem.text, text)


def test_oracle_events_of_each_turn_are_valid_on_the_bank_before_it(conversations):
    """Every UPDATE / DELETE / NONE names a memory that exists then; a probe's answer is right after the turn."""
    conv = conversations["train"][0]
    kinds = set()
    for dia_id, known in conv.oracle.items():
        bank = manager.oracle_banks(conv, before=dia_id)[known["speaker"]]
        for e in known["events"]:
            kinds.add(e["event"])
            if e["event"] != "ADD":
                assert e["id"] in bank.memories, (dia_id, e)
            if e["event"] == "UPDATE":
                assert e["old_memory"] == bank.memories[e["id"]].text
    assert kinds == {"ADD", "UPDATE", "DELETE", "NONE"} or kinds == {"ADD", "UPDATE", "NONE"}


def test_decisions_are_classified_as_the_oracle_would(conversations):
    log = [{"op": "DELETE", "id": "3"}, {"op": "ADD", "id": "9"}]
    assert manager.decision(log) == ("UPDATE", frozenset({"3"}))  # a replacement is an update
    assert manager.decision(log[:1]) == ("DELETE", frozenset({"3"}))
    assert manager.decision(log[1:]) == ("ADD", frozenset())
    assert manager.decision([]) == ("NONE", frozenset())
    assert manager.decision([{"op": "UPDATE", "id": "1"}, {"op": "ADD", "id": "2"}])[0] == "MIXED"
    conv = conversations["train"][0]
    for dia_id, known in conv.oracle.items():
        bank = manager.oracle_banks(conv, before=dia_id)[known["speaker"]]
        start = len(bank.log)
        bank.apply(known["events"])
        assert manager.decision(bank.log[start:]) == manager.oracle_decision(conv, dia_id)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("agent", ["answer", "manager"])
def test_training_runs_on_the_gym_and_resumes(agent, tiny_checkpoints, tmp_path):
    """The cpu preset's data: a tiny random model trains either agent on the gym; a run killed after step 1
    and resumed ends where an unbroken one does; the manager's log has its decisions against the oracle's."""
    import train
    from safetensors.torch import load_file

    ckpt = tiny_checkpoints["qwen2"][0]
    # the manager's guided output (a memory copied) is ~100 one-byte tokens in the tiny vocabulary: room to finish
    common = ["--agent", agent, "--preset", "cpu", "--model", ckpt, "--max-new-tokens", 8 if agent == "answer" else 200,
              "--group-size", 2,
              "--questions-per-step", 1, "--memories-per-speaker", 1,
              "--val-limit", 2, "--val-every", 1, "--save-every", 1, "--lr", 1e-3, "--answerer", ckpt,
              "--embedder", "hash"]  # MiniLM, the manager column's, is tested in test_minilm and test_manager_ops
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    for out, steps, extra in ((killed, 1, []), (killed, 2, ["--resume"]), (straight, 2, [])):
        args = train.parse_args([str(x) for x in common + ["--out", out, "--steps", steps, *extra]],
                                settings=dict(answer_max_new_tokens=3, manager_k=1))
        assert args.data == "gym"
        train.run(args)
    a, b = [load_file(out / "checkpoint" / "model.safetensors") for out in (straight, killed)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_metrics(killed)
    assert [r["step"] for r in rows] == [0, 1, 2] and "val_reward_se" in rows[2] and rows[2]["val_n"] == 2
    if agent == "manager":
        assert "op_acc" in rows[1] and "val_op_acc" in rows[2]
        assert any(k.startswith("op_acc_") for k in rows[1])
        # the cpu preset's manager: the ops format (guided: every output that ends parses; a random model's merge
        # text can run past the token limit), the probability reward, the sampled decision mix and the groups
        # dynamic sampling looked at
        assert rows[1]["parse_fail"] <= rows[1]["truncated"] < 1 and "p_gold" in rows[1] and "sampled_groups" in rows[1]
        assert sum(rows[1][f"dec_{d}"] for d in ("add", "update", "delete", "none", "mixed")) == pytest.approx(1.0)


def test_evaluate_on_the_gym_with_oracle_banks_and_a_manager(tiny_checkpoints, tmp_path, capsys):
    """evaluate.py --data gym: oracle banks (every evidence turn's memory retrievable), the gym's category
    labels; a manager's decisions are tallied against the oracle's, one per manager call."""
    import evaluate as E

    ckpt = tiny_checkpoints["llama"][0]
    common = ["--data", "gym", "--model", str(ckpt), "--split", "val", "--limit", "4", "--k", "20", "--max-new-tokens",
              "3", "--no-distill"]
    report = E.run(E.parse_args(common + ["--manager", "oracle", "--out", str(tmp_path / "oracle")]))
    assert report["overall"]["count"] == 4 and report["overall"]["recall"] == 1.0  # k=20: each bank whole
    assert "| 2 changed |" in capsys.readouterr().out
    calls = {}
    real = manager.generate
    manager.generate = lambda *a, **k: calls.setdefault("n", []).append(1) or real(*a, **k)
    try:
        report = E.run(E.parse_args(common + ["--manager", "base", "--manager-max-new-tokens", "4",
                                              "--out", str(tmp_path / "base")]))
    finally:
        manager.generate = real
    table = report["bank_stats"]["decisions"]
    assert sum(sum(row.values()) for row in table.values()) == len(calls["n"]) > 10
    assert set(table) <= {"ADD", "UPDATE", "DELETE", "NONE"}


def test_decision_table_by_hand():
    import evaluate as E

    text = E.format_decisions({"ADD": {"ADD": 3, "NONE": 1}, "UPDATE": {"MIXED": 2}})
    assert "| ADD | 3 | 0 | 0 | 1 | 0 | 75.0 |" in text and "| UPDATE | 0 | 0 | 0 | 0 | 2 | 0.0 |" in text
    assert "| precision | 100.0 | - | - | 0.0 | - | |" in text  # NONE chosen once, when ADD was right
    assert "operation accuracy (kind): 50.0 over 6 manager calls" in text


def test_difficulty_knobs():
    few = gym.generate_conversation(0, "train", gym.Level(attributes=("city", "dogs"), sessions=2, distractors=0))
    a, b = few["conversation"]["speaker_a"], few["conversation"]["speaker_b"]
    asked = {qa["question"].replace(a, "{p}").replace(b, "{p}") for qa in few["qa"]}
    assert {q for q in asked if not q.startswith("When")} == {gym.QUESTION["city"], gym.QUESTION["dogs"]}
    assert [k for k in few["conversation"] if k.endswith("date_time")] == ["session_1_date_time",
                                                                           "session_2_date_time"]
    facts = [f for per in few["observation"].values() for fs in per.values() for f, _ in fs]
    assert not any(DISTRACTOR.match(f) for f in facts)
    busy = gym.generate_conversation(0, "train", gym.Level(distractors=4))
    facts = [f for per in busy["observation"].values() for fs in per.values() for f, _ in fs]
    assert sum(bool(DISTRACTOR.match(f)) for f in facts) == 8  # 4 per speaker

