"""A killed or damaged run never ends in a traceback: a log line cut by a kill, each file a resume reads missing or
damaged, evaluate.py's bank statistics across a resume, and SIGKILL at random moments (bench/kill_soak.py)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import decision
import evaluate as E
import model as M
import train
from test_train import flags, read_metrics, repeat_task

ROOT = Path(__file__).resolve().parents[1]
DROP = {"seconds", "rollout_s", "update_s", "sync_s", "peak_rss_gb"}  # timings, and this process's own peak


def same_rows(a, b):
    return [{k: v for k, v in r.items() if k not in DROP} for r in a] == [{k: v for k, v in r.items() if k not in DROP}
                                                                          for r in b]


def test_a_log_line_cut_by_a_kill_is_skipped_on_resume(tiny_checkpoints, tmp_path):
    """A kill while a step's line is written leaves half a line after the last checkpoint (and a disk can leave
    junk anywhere): the resume drops every line that does not parse and ends where an unbroken run does."""
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    common = ("--max-new-tokens", 4, "--group-size", 2, "--questions-per-step", 2, "--val-every", 1,
              "--save-every", 1, "--lr", 1e-3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.run(flags(ckpt, straight, "--steps", 2, *common), repeat_task(tok))
    train.run(flags(ckpt, killed, "--steps", 1, *common), repeat_task(tok))
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    step2 = (straight / "metrics.jsonl").read_text().splitlines()[2]
    (killed / "metrics.jsonl").write_text(lines[0] + "\n{not json\n" + lines[1] + "\n" + step2[:len(step2) // 2])
    train.run(flags(ckpt, killed, "--steps", 2, "--resume", *common), repeat_task(tok))
    assert [r["step"] for r in read_metrics(killed)] == [0, 1, 2]
    assert same_rows(read_metrics(killed), read_metrics(straight))


def digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.safetensors", "critic_optimizer.safetensors",
                                  "critic.safetensors", "model.safetensors"])
def test_each_file_a_resume_reads_missing_or_damaged_ends_in_one_line(tiny_checkpoints, tmp_path, name):
    """PPO (a critic and its optimizer too): each file of the checkpoint cut in half, then missing. The run stops
    with one line that names the file and the ways out, before it writes anything (folder unchanged)."""
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    common = ("--algo", "ppo", "--max-new-tokens", 3, "--group-size", 2, "--questions-per-step", 2,
              "--val-every", 1, "--save-every", 1)
    run = tmp_path / "run"
    train.run(flags(ckpt, run, "--steps", 1, *common), repeat_task(tok))
    path = run / "checkpoint" / name
    for damage in ("cut", "missing"):
        if damage == "cut":
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
        else:
            path.unlink()
        before = digest(run)
        with pytest.raises(SystemExit) as stop:
            train.run(flags(ckpt, run, "--steps", 2, "--resume", *common), repeat_task(tok))
        message = str(stop.value.code)
        assert "\n" not in message and str(path) in message, message
        assert "delete" in message and "--out" in message, message
        assert digest(run) == before, damage  # nothing written over: the log, the checkpoint


def test_a_damaged_decision_head_ends_in_one_line(tmp_path):
    net = type("Net", (), {"lm_head": torch.nn.Linear(1, 1)})()
    with pytest.raises(SystemExit, match="no .*decision_head.safetensors.*delete"):
        decision.attach(net, tmp_path, [], 0)
    save_file({"w": torch.zeros(3)}, str(tmp_path / decision.FILE))  # mean and std missing
    with pytest.raises(SystemExit, match="decision_head.safetensors is damaged.*--out"):
        decision.attach(net, tmp_path, [], 0)


def test_a_resumed_evaluation_reports_the_same_bank_stats(tiny_checkpoints, tmp_path):
    """The manager's counts (parse failures, its decisions against the oracle's) are kept with each conversation's
    banks: a run resumed after its banks were built reports what an unbroken run does."""
    ckpt = tiny_checkpoints["llama"][0]
    common = ["--model", str(ckpt), "--data", "gym", "--split", "val", "--limit", "20", "--k", "2",
              "--max-new-tokens", "4", "--manager", "base", "--manager-max-new-tokens", "4", "--manager-k", "2",
              "--no-distill"]
    straight = E.run(E.parse_args(common + ["--out", str(tmp_path / "straight")]))
    assert straight["bank_stats"]["decisions"]  # the gym: the manager's decisions were compared
    killed = tmp_path / "killed"
    E.run(E.parse_args(common + ["--out", str(killed)]))
    rows = (killed / "predictions.jsonl").read_text().splitlines()
    (killed / "predictions.jsonl").write_text("\n".join(rows[:5]) + "\n" + rows[5][:10])  # killed while answering
    (killed / "report.json").unlink()
    resumed = E.run(E.parse_args(common + ["--out", str(killed)]))
    assert resumed["bank_stats"] == straight["bank_stats"]
    assert (killed / "predictions.jsonl").read_text() == (tmp_path / "straight" / "predictions.jsonl").read_text()


@pytest.mark.parametrize("what", ["head", "evaluate"])
def test_sigkill_at_random_moments_ends_as_an_unbroken_run(tiny_smollm2_path, tmp_path, what):
    """bench/kill_soak.py --smoke: the decision head's recipe and evaluate.py with that manager, each killed by
    SIGKILL at two random moments and resumed, end with the same head weights, log, predictions and report (a
    random network with SmolLM2's tokenizer: what is tested is the resume, not the model)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "kill_soak.py"), "--smoke", "--what", what,
                        "--model", str(tiny_smollm2_path), "--work", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "same as the unbroken run: yes" in r.stdout, r.stdout
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_resumed_run_keeps_the_float32_kernel_it_started_with(tiny_checkpoints, tmp_path, monkeypatch):
    """The decode kernel changes float32 rounding: train.py records it in trainer_state.json, and a resume takes the
    recorded one whatever this process's probe says."""
    import precision
    monkeypatch.setattr(precision, "PACK_FLOAT32", precision.PACK_FLOAT32)  # restored after the test
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    common = ("--max-new-tokens", 3, "--group-size", 2, "--questions-per-step", 2, "--save-every", 1)
    train.run(flags(ckpt, tmp_path, "--steps", 1, *common), repeat_task(tok))
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["args"]["pack_float32"] is precision.PACK_FLOAT32
    state["args"]["pack_float32"] = not precision.PACK_FLOAT32
    (tmp_path / "checkpoint" / "trainer_state.json").write_text(json.dumps(state))
    train.run(flags(ckpt, tmp_path, "--steps", 2, "--resume", *common), repeat_task(tok))
    assert precision.PACK_FLOAT32 is state["args"]["pack_float32"]
