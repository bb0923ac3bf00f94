"""data/longmemeval.py on a hand-written file in the published schema, and evaluate.py --data longmemeval."""

import hashlib
import json
from pathlib import Path

import pytest

import evaluate as E
from data import longmemeval as L
from data.locomo import DataError

SMALL = Path(__file__).resolve().parent / "data" / "longmemeval_small.json"


def test_items_become_conversations_with_their_task_type_and_evidence():
    convs, qs = L.load_conversations(SMALL), L.load_split("test", SMALL)
    assert [q.conv_id for q in qs] == [c.sample_id for c in convs] and len(qs) == 7
    assert sorted({q.category for q in qs}) == [1, 2, 3, 4, 5, 6]  # every task type
    by_id = {q.conv_id: q for q in qs}
    abstain = by_id["e47becba_abs"]  # an abstention question keeps its task type
    assert L.CATEGORY_LABELS[abstain.category] == "single-session-user" and abstain.answer.startswith("The information")
    assert abstain.evidence == ["D1:1", "D1:2"]  # no has_answer turn: the answer session's turns
    assert by_id["58ef2f1c"].evidence == ["D1:2"]  # the assistant's turn marked has_answer
    assert by_id["6a1eabeb"].question.endswith("(asked on 2023/08/10 (Thu) 08:00)")
    update = next(c for c in convs if c.sample_id == "6a1eabeb")  # knowledge update: old value first
    assert [t.text[:30] for t in update.turns() if t.speaker == "user"] == [
        "My personal best in the 5K is ", "I set a new 5K personal best t"]
    multi = next(c for c in convs if c.sample_id == "0a995998")  # listed unsorted in the file: sorted by date
    assert [s.date_text for s in multi.sessions] == ["2023/02/05 (Sun) 16:20", "2023/02/11 (Sat) 11:05"]
    assert multi.turns()[0].text.startswith("I have to pick up my dry cleaning") and multi.speaker_a == "user"
    with pytest.raises(DataError, match="only a test split"):
        L.load_split("train", SMALL)


def test_evaluate_end_to_end_reports_every_task_type(tiny_checkpoints, tmp_path, capsys):
    ckpt = tiny_checkpoints["llama"][0]
    common = ["--data", "longmemeval", "--data-file", str(SMALL), "--model", str(ckpt), "--k", "2",
              "--max-new-tokens", "3"]
    report = E.run(E.parse_args(common + ["--out", str(tmp_path / "r1")]))
    assert report["settings"]["facts"] == "turn"  # the dataset ships no facts
    assert sorted(report["categories"]) == ["1", "2", "3", "4", "5", "6"] and report["overall"]["count"] == 7
    assert report["categories"]["1"]["count"] == 2
    table = capsys.readouterr().out
    assert "| 5 knowledge-update | 1 |" in table and "| 6 temporal-reasoning | 1 |" in table
    bank = json.loads((tmp_path / "r1" / "banks" / "6a1eabeb" / "speaker_a.json").read_text())
    assert [m["text"][:8] for m in bank["memories"]] == ["My perso", "I set a "]  # the user's turns, in order
    rows = [json.loads(x) for x in (tmp_path / "r1" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["recall"] is not None for r in rows)
    rag = E.run(E.parse_args(common + ["--baseline", "mem0", "--manager-max-new-tokens", "4",
                                       "--out", str(tmp_path / "mem0")]))
    assert rag["overall"]["count"] == 7 and rag["settings"]["manager"] == "base"


def test_a_corrupt_or_truncated_file_gives_one_clear_error(tmp_path):
    cut = tmp_path / "cut.json"
    cut.write_text(SMALL.read_text()[:500])
    with pytest.raises(DataError, match="not valid JSON .*: truncated or corrupt"):
        L.load_split("test", cut)
    wrong = tmp_path / "wrong.json"
    items = json.loads(SMALL.read_text())
    del items[2]["haystack_dates"]
    wrong.write_text(json.dumps(items))
    with pytest.raises(DataError, match="not in LongMemEval's format .*haystack_dates"):
        L.load_conversations(wrong)
    with pytest.raises(SystemExit, match="error: .*not valid JSON"):  # the command line: one line, no traceback
        E.main(["--data", "longmemeval", "--data-file", str(cut), "--out", str(tmp_path / "o")])


def test_download_pins_the_revision_checks_the_sha256_and_writes_atomically(tmp_path, monkeypatch):
    import huggingface_hub

    target = tmp_path / "longmemeval_oracle.json"
    monkeypatch.setattr(L, "DATA_FILE", target)

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match=f"downloading longmemeval_oracle.json .* {L.REPO} failed .*copy it to"):
        L.load_split("test")

    calls = []

    def served(repo, name, repo_type, revision):
        calls.append((repo, name, repo_type, revision))
        return str(SMALL)  # stands in for the real file's bytes
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", served)
    with pytest.raises(DataError, match="sha256 .* is not that of longmemeval_oracle.json"):
        L.load_split("test")  # the small file is not the pinned one: refused, nothing written
    assert not target.exists() and calls[0] == (L.REPO, L.FILE, "dataset", L.REVISION)
    monkeypatch.setattr(L, "SHA256", hashlib.sha256(SMALL.read_bytes()).hexdigest())
    assert len(L.load_split("test")) == 7
    assert target.read_bytes() == SMALL.read_bytes() and not (tmp_path / "longmemeval_oracle.json.tmp").exists()
