"""Every benchmark script runs at its smallest setting (--smoke), so a change that breaks one fails here.

The figures they print are not checked (this machine's timings drift); what is checked is that each script
runs to the end on the current code and prints the table or line that the README quotes from it.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *flags) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *map(str, flags)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{script} --smoke failed:\n{r.stderr[-3000:]}"
    return r.stdout


def test_every_bench_script_is_covered():
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    assert scripts == {"bench_16bit.py", "bench_engine.py", "bench_generate.py", "bench_grpo_step.py", "bench_guided.py",
                       "bench_loss_pass.py", "bench_memory.py", "bench_prefix.py", "bench_precision.py", "bench_rss.py",
                       "bench_scale.py", "estimate_7b.py",
                       "evidence_recall.py", "manager_priors.py", "manager_rewards.py", "paired.py", "sample_rewards.py",
                       "shown_memories.py",
                       "kill_soak.py"}  # run by test_resume.py (SIGKILL at random moments, then compared)


@pytest.mark.parametrize("script, model, expect", [
    ("bench_16bit.py", None, "| attention batch | cached keys | bf16 us | float32 us |"),
    ("bench_engine.py", "llama", "sampling of one GRPO step: before"),
    ("bench_generate.py", None, "| device | dtype | batch | ours tok/s | transformers tok/s | speed-up |"),
    ("bench_grpo_step.py", "llama", "ours: "),
    ("bench_guided.py", "llama", "| 2 | "),
    ("bench_loss_pass.py", "qwen2", "float32: shared prompt"),
    ("bench_memory.py", None, "top-60 search: median"),
    ("bench_prefix.py", "llama", "  manager calls "),
    ("bench_precision.py", "llama", "| model part | float32 | bf16 | speed-up |"),
    ("bench_rss.py", "llama", "| after | resident | change | peak so far |"),
    ("bench_scale.py", "llama", "LoRA r=2"),
    ("estimate_7b.py", None, "per step on one GPU"),
    ("evidence_recall.py", None, "overall: recall@60"),
    ("shown_memories.py", None, "| hash | 2 | 1.00 +- 0.00 (n=8)"),
    ("sample_rewards.py", "llama", "groups with signal"),
    ("manager_rewards.py", "llama", "| oracle kind (turns) |"),
    ("manager_priors.py", None, "AUC of P(new), ADD against UPDATE change states: "),
    ("paired.py", "llama", "2 questions scored by both"),
])
def test_bench_script_smoke(script, model, expect, tiny_checkpoints):
    out = run_bench(script, *(["--model", tiny_checkpoints[model][0]] if model else []))
    assert expect in out


def test_manager_priors_auc_hand_computed():
    sys.path.insert(0, str(ROOT / "bench"))
    from manager_priors import auc
    # pairs (1,0) win, (1,2) loss, (2,0) win, (2,2) tie: 2.5 of 4
    assert auc([1.0, 2.0], [0.0, 2.0]) == 0.625
    assert auc([3.0], [1.0, 2.0]) == 1.0 and auc([0.0], [1.0]) == 0.0



@pytest.mark.parametrize("flags, says", [(["--split", "heldout", "--family", "1"], "not with --split heldout"),
                                         (["--split", "val", "--family", "9"], "give one of the phrasing families")])
def test_manager_priors_refuses_a_family_it_cannot_word(flags, says):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "manager_priors.py"), *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr.strip().splitlines()[-1]

def test_paired_difference_hand_computed():
    sys.path.insert(0, str(ROOT / "bench"))
    from paired import paired
    a = [{"em": x, "f1": x} for x in (1.0, 0.0, 1.0, 0.0)]
    b = [{"em": x, "f1": 1.0} for x in (1.0, 1.0, 1.0, 0.0)]
    # em: differences 0, 1, 0, 0: mean 0.25, sample sd 0.5, standard error 0.5 / 2; A's 0.5 +- (1/3/4) ** 0.5
    # f1: differences 0, 1, 0, 1: mean 0.5, sd (1/3) ** 0.5, standard error 0.2887
    text = paired(a, b)
    assert "em  A  50.00 +- 28.87   B  75.00 +- 25.00   B - A +25.00 +- 25.00   (B better on 1, worse on 0)" in text
    assert "f1  A  50.00 +- 28.87   B 100.00 +- 0.00   B - A +50.00 +- 28.87   (B better on 2, worse on 0)" in text
