"""plot.py: curves.png from a metrics.jsonl, and the hint (not a failure) without matplotlib."""

import json
import sys

import pytest

import model as M
import plot
import train
from test_train import repeat_task

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, manager: bool):
    """A hand-written log of 6 steps: validation at 0, 3 and 6 (with standard errors), rewards per step; a
    manager run also logs its sampled decision mix; the last line is cut short, as a killed run leaves it."""
    rows = [{"step": 0, "val_reward": 0.15, "val_reward_se": 0.03, "val_em": 0.02, "val_em_se": 0.02, "val_n": 64}]
    for s in range(1, 7):
        row = {"step": s, "reward": 0.1 + 0.05 * s, "reward_se": 0.04}
        if manager:
            add = s / 7
            row.update(sampled_dec_add=add, sampled_dec_update=1 - add - 0.1, sampled_dec_none=0.1)
        if s % 3 == 0:
            row.update(val_reward=0.15 + 0.05 * s, val_reward_se=0.04, val_em=0.05 * s, val_em_se=0.05)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "rew')


@pytest.mark.parametrize("manager", [False, True])
def test_curves_are_drawn_from_a_hand_written_log(tmp_path, manager):
    pytest.importorskip("matplotlib")
    log = tmp_path / "metrics.jsonl"
    write_metrics(log, manager)
    rows = plot.read_metrics(log)
    assert len(rows) == 7  # the cut line is skipped
    steps, vals, ses = plot.series(rows, "val_em")
    assert steps == [0, 3, 6] and vals == pytest.approx([0.02, 0.15, 0.3]) and ses == [0.02, 0.05, 0.05]
    assert plot.decision_keys(rows) == (["sampled_dec_add", "sampled_dec_update", "sampled_dec_none"] if manager else [])
    assert plot.save_curves(log) == f"curves: {tmp_path / 'curves.png'}"
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == PNG and len(data) > 20_000  # three panels (two without decisions) at 110 dpi


def test_the_command_redraws_and_names_bad_input(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "metrics.jsonl"
    write_metrics(log, False)
    plot.main([str(log), "--out", str(tmp_path / "x" / "c.png")])
    assert (tmp_path / "x" / "c.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit, match="no such metrics file"):
        plot.main([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no metrics lines"):
        plot.main([str(tmp_path / "empty.jsonl")])


def test_a_run_without_matplotlib_finishes_and_prints_the_hint(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    ckpt = tiny_checkpoints["qwen2"][0]
    _, tok = M.load_model(ckpt)
    args = train.parse_args(["--model", str(ckpt), "--out", str(tmp_path), "--preset", "cpu", "--data", "locomo",
                             "--steps", "1", "--max-new-tokens", "4", "--group-size", "2", "--questions-per-step", "2"])
    train.run(args, repeat_task(tok))
    err = capsys.readouterr().err
    assert f"pip install matplotlib, then: python plot.py {tmp_path / 'metrics.jsonl'}" in err
    assert not (tmp_path / "curves.png").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # step 0's validation and step 1
