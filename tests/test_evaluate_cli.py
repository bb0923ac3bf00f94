"""python evaluate.py end to end on a tiny checkpoint: report, predictions, banks, resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate as E
from data import locomo
import metrics
from memory import MemoryBank

ROOT = Path(__file__).resolve().parents[1]


def evaluate(ckpt, out, *extra):
    return E.run(E.parse_args(["--model", str(ckpt), "--out", str(out), "--split", "val", "--k", "2",
                               "--max-new-tokens", "6", *map(str, extra)]))


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_end_to_end_report_recomputes_from_predictions(tiny_checkpoints, tmp_path, capsys):
    report = evaluate(tiny_checkpoints["llama"][0], tmp_path, "--limit", 6)
    rows = lines(tmp_path / "predictions.jsonl")
    assert [(r["conv_id"], r["index"]) for r in rows] == [("conv-30", i) for i in range(6)]  # file order
    for r in rows:  # every score recomputed from the row's own parsed answer
        assert r["f1"] == metrics.f1(r["answer"], r["gold"]) and r["em"] == metrics.exact_match(r["answer"], r["gold"])
        assert r["bleu1"] == metrics.bleu1(r["answer"], r["gold"])
        assert r["locomo_f1"] == metrics.locomo_f1(r["answer"], r["gold"], r["category"])
        assert not r["parse_ok"] and r["raw"]  # a random model writes no **Answer:**; counted, not fatal
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["overall"] == report["overall"]
    for cat, v in on_disk["categories"].items():
        mine = [r for r in rows if str(r["category"]) == cat]
        assert v["count"] == len(mine)
        for key in ("f1", "bleu1", "locomo_f1", "em", "recall"):
            assert v[key] == pytest.approx(sum(r[key] for r in mine) / len(mine)), (cat, key)
    assert on_disk["overall"]["count"] == 6 and on_disk["overall"]["parse_failures"] == 6
    # banks are files, one per speaker (beside stats.json, their build counts), with every observation of conv-30 ADDed
    banks = [MemoryBank.load(p) for p in sorted((tmp_path / "banks" / "conv-30").glob("speaker_*.json"))]
    assert len(banks) == 2 and all(len(b) > 10 for b in banks)
    table = capsys.readouterr().out
    assert "| overall | 6 |" in table and table.index("2 temporal") < table.index("overall")


def test_summary_of_hand_made_rows():
    """The report's means, counts and parse failures, per category and overall, on rows with known scores
    (a random model scores 0 almost everywhere, so the end-to-end test cannot tell a mean from a zero)."""
    def row(cat, f1, bleu1, locomo_f1, em, recall, parse_ok, judge=None):
        r = {"category": cat, "f1": f1, "bleu1": bleu1, "locomo_f1": locomo_f1, "em": em, "recall": recall,
             "parse_ok": parse_ok}
        return r if judge is None else {**r, "judge": judge}
    rows = [row(1, 1.0, 0.5, 0.8, 1.0, 1.0, True, 1.0), row(1, 0.5, 0.25, 0.4, 0.0, None, False, 0.0),
            row(2, 0.25, 1.0, 0.2, 0.0, 0.5, True)]
    report = E.summarise(rows)
    one, two, overall = report["categories"]["1"], report["categories"]["2"], report["overall"]
    assert one == {"count": 2, "parse_failures": 1, "f1": 0.75, "bleu1": 0.375, "locomo_f1": pytest.approx(0.6),
                   "em": 0.5, "judge": 0.5, "recall": 1.0}  # recall: the one row with evidence
    assert two == {"count": 1, "parse_failures": 0, "f1": 0.25, "bleu1": 1.0, "locomo_f1": 0.2, "em": 0.0,
                   "recall": 0.5}  # no judge verdict in this category: no judge key
    assert overall == {"count": 3, "parse_failures": 1, "f1": pytest.approx(1.75 / 3), "bleu1": pytest.approx(1.75 / 3),
                       "locomo_f1": pytest.approx(1.4 / 3), "em": pytest.approx(1 / 3), "judge": 0.5, "recall": 0.75,
                       # sample standard deviation / sqrt(n): EM [1, 0, 0] -> sqrt((1/3) / 3); F1 [1, .5, .25]
                       "em_se": pytest.approx(1 / 3), "f1_se": pytest.approx((0.875 / 6 / 3) ** 0.5)}
    table = E.format_table(report, "title", locomo.CATEGORY_LABELS)
    assert "| 1 single-hop | 2 | 75.00 | 37.50 | 60.00 | 50.00 | 50.00 | 100.00 |" in table
    assert "| 2 temporal | 1 | 25.00 | 100.00 | 20.00 | 0.00 | - | 50.00 |" in table


def test_a_killed_run_resumes_without_redoing_predictions(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["llama"][0]
    evaluate(ckpt, tmp_path, "--limit", 3)
    first = (tmp_path / "predictions.jsonl").read_text()
    with (tmp_path / "predictions.jsonl").open("a") as f:
        f.write('{"conv_id": "conv-30", "index": 3, "categ')  # the kill cut a line in half
    bank_file = tmp_path / "banks" / "conv-30" / "speaker_a.json"
    bank_file.write_text(bank_file.read_text())  # unchanged content; the run must load, not rebuild, it
    stamp = bank_file.stat().st_mtime_ns
    report = evaluate(ckpt, tmp_path, "--limit", 5)
    rows = lines(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and report["overall"]["count"] == 5
    assert (tmp_path / "predictions.jsonl").read_text().startswith(first)  # the old lines kept as they were
    assert bank_file.stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="other settings"):
        evaluate(ckpt, tmp_path, "--limit", 5, "--k", 3)


def test_baselines_set_their_flags_and_explicit_flags_win():
    rag = E.parse_args(["--baseline", "rag", "--out", "x"])
    assert (rag.facts, rag.manager, rag.distill) == ("turn", "add-all", False)
    assert E.parse_args(["--baseline", "rag", "--facts", "observation", "--out", "x"]).facts == "observation"
    mem0 = E.parse_args(["--baseline", "mem0", "--out", "x"])
    assert (mem0.manager, mem0.distill) == ("base", False)
    full = E.parse_args(["--manager", "runs/manager/checkpoint", "--out", "x"])
    assert (full.manager, full.facts, full.distill) == ("runs/manager/checkpoint", "observation", True)


def test_a_manager_checkpoint_runs_in_the_format_and_k_it_was_trained_with(tmp_path):
    """train.py records its flags in trainer_state.json: evaluate.py (and phase two, agents.answer_task) show the
    manager as many memories as it learned to choose from, in its format; an explicit flag wins."""
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 16, "args": {"manager_k": 1,
                                                                                  "manager_format": "ops"}}))
    trained = E.parse_args(["--manager", str(tmp_path), "--out", "x"])
    assert (trained.manager_k, trained.manager_format) == (1, "ops")
    assert E.parse_args(["--manager", str(tmp_path), "--manager-k", "3", "--out", "x"]).manager_k == 3
    assert (E.parse_args(["--manager", "add-all", "--out", "x"]).manager_k,
            E.parse_args(["--manager", "add-all", "--out", "x"]).manager_format) == (5, "mem0")  # Mem0's


def test_the_untrained_manager_builds_the_banks(tiny_checkpoints, tmp_path, first_sessions_only):
    """mem0 baseline: the base model manages memory; its broken JSON is counted and the run completes.
    (conv-30 is cut to its first session to keep the test short.)"""
    report = evaluate(tiny_checkpoints["qwen2"][0], tmp_path, "--baseline", "mem0", "--limit", 1,
                      "--manager-max-new-tokens", 6)
    stats = report["bank_stats"]
    assert stats["parse_fail"] > 0 and stats["ADD"] >= 2  # the first fact of each speaker goes in directly
    assert report["overall"]["count"] == 1
    n_facts = len(next(c for c in first_sessions_only() if c.sample_id == "conv-30").observations)
    sizes = [len(MemoryBank.load(p)) for p in (tmp_path / "banks" / "conv-30").glob("speaker_*.json")]
    assert 2 <= sum(sizes) <= n_facts  # what the manager kept of the session's facts


def test_bad_flags_and_missing_checkpoint_give_clear_errors(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True)
    bad = cli("--split", "dev", "--out", str(tmp_path))
    assert bad.returncode == 2 and "invalid choice: 'dev'" in bad.stderr
    missing = cli("--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--limit", "1")
    assert missing.returncode == 1 and "error:" in missing.stderr and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr
    neg = cli("--limit", "-1", "--out", str(tmp_path))
    assert neg.returncode == 2 and "--limit must be >= 0" in neg.stderr
