"""data/locomo.py against the counts in docs/method.md section 2."""

import json
from collections import Counter
from datetime import datetime

import pytest

from data import locomo


def test_totals():
    convs = locomo.load_conversations()
    assert len(convs) == 10
    assert sum(len(c.sessions) for c in convs) == 272
    assert sum(len(c.turns()) for c in convs) == 5882
    assert sum(len(c.qa) for c in convs) == 1986
    cats = Counter(qa["category"] for c in convs for qa in c.qa)
    assert cats == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}


@pytest.mark.parametrize("split,n,per_cat", [("train", 152, {1: 32, 2: 37, 3: 13, 4: 70}),
                                             ("val", 81, {1: 11, 2: 26, 4: 44}),
                                             ("test", 1307, {1: 239, 2: 258, 3: 83, 4: 727})])
def test_memory_r1_split(split, n, per_cat):
    qs = locomo.load_split(split)
    assert len(qs) == n
    assert Counter(q.category for q in qs) == per_cat
    assert all(isinstance(q.answer, str) and q.answer for q in qs)
    if split == "train":
        assert {q.conv_id for q in qs} == {"conv-26"}
    if split == "test":
        assert len({q.conv_id for q in qs}) == 8


def test_adversarial_only_when_asked():
    qs = locomo.load_split("train", include_adversarial=True)
    assert len(qs) == 152 + 47
    assert all(q.answer for q in qs if q.category == 5)


def test_first_conversation_parsed():
    conv = locomo.load_conversations()[0]
    assert (conv.sample_id, conv.speaker_a, conv.speaker_b) == ("conv-26", "Caroline", "Melanie")
    assert [s.index for s in conv.sessions] == list(range(1, 20))  # 19 sessions though 35 date keys
    first = conv.sessions[0]
    assert first.date_time == datetime(2023, 5, 8, 13, 56)
    assert first.turns[0].dia_id == "D1:1" and first.turns[0].speaker == "Caroline"
    image_turn = next(t for t in first.turns if t.dia_id == "D1:5")
    assert image_turn.text.endswith("[shares a photo of a dog walking past a wall with a painting of a woman]")
    fact = conv.observations[0]
    assert fact.speaker == "Caroline" and fact.dia_ids == ["D1:3"] and "support group" in fact.text
    q = locomo.load_split("train")[0]
    assert (q.question, q.answer, q.evidence) == ("When did Caroline go to the LGBTQ support group?",
                                                   "7 May 2023", ["D1:3"])


def test_int_answers_become_strings():
    raw = json.loads(locomo.DATA_FILE.read_text())
    ints = [(s["sample_id"], i) for s in raw for i, qa in enumerate(s["qa"]) if isinstance(qa.get("answer"), int)]
    assert len(ints) == 6
    by_key = {(q.conv_id, q.index): q for split in ("train", "val", "test") for q in locomo.load_split(split)}
    assert all(key in by_key for key in ints)  # all six are train questions (conv-26, categories 1-2)
    for key in ints:
        want = raw[[s["sample_id"] for s in raw].index(key[0])]["qa"][key[1]]["answer"]
        assert isinstance(by_key[key].answer, str) and by_key[key].answer == str(want)


def test_evidence_normalisation():
    assert locomo.normalise_evidence(["D8:6; D9:17", "D", "D:11:26", "D9:1 D4:4"]) == \
        ["D8:6", "D9:17", "D11:26", "D9:1", "D4:4"]


def test_corrupt_or_foreign_file(tmp_path):
    bad = tmp_path / "locomo10.json"
    bad.write_text("[]")
    with pytest.raises(locomo.DataError, match="sha256 .* is not LoCoMo's"):
        locomo.load_conversations(bad)


def test_missing_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(locomo.DataError, match="not found, and downloading locomo10.json"):
        locomo.load_conversations(tmp_path / "absent.json")


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        locomo.load_split("dev")


def test_download_when_absent_checks_and_writes_atomically(tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    def fake_download(repo_id, filename, repo_type):
        calls.append((repo_id, filename, repo_type))
        return str(locomo.DATA_FILE)  # the real bytes, as the mirror would serve them

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    target = tmp_path / "sub" / "locomo10.json"
    assert len(locomo.load_conversations(target)) == 10
    assert calls == [("KimmoZZZ/locomo", "locomo10.json", "dataset")]
    assert target.read_bytes() == locomo.DATA_FILE.read_bytes() and not target.with_suffix(".tmp").exists()

    bad = tmp_path / "bad.json"
    bad.write_text("not locomo")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(bad))
    with pytest.raises(locomo.DataError, match="is not LoCoMo's"):
        locomo.load_conversations(tmp_path / "again.json")
    assert not (tmp_path / "again.json").exists()
