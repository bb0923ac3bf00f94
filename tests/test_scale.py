"""Scaling up (issue 7): LoRA adapters and their export, micro-batching, torch.compile, and torchrun with
two gloo ranks against one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine
import lora
import losspass
import model as M
import train
import sampling
from sampling import generate
from test_train import flags, read_metrics, repeat_task

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 42, 99, 3, 64, 200, 7, 11, 250]])


def test_an_untrained_adapter_changes_nothing_and_disabling_gives_the_base(tiny_checkpoints):
    base, _ = M.load_model(tiny_checkpoints["qwen2"][0])
    want = base(IDS)
    model = lora.add_lora(base, rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(trainable) == 2 * 7 * model.cfg.n_layers  # A and B on seven projections per block
    assert torch.equal(model(IDS), want)  # B = 0: exactly the base model
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_b.normal_(std=0.05)
    adapted = model(IDS)
    assert (adapted - want).abs().max() > 1e-3
    with lora.adapters_disabled(model):
        assert torch.equal(model(IDS), want)  # the KL reference: no second copy needed
    assert torch.equal(model(IDS), adapted)


def test_adapters_round_trip_in_peft_layout_and_merge(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints["llama"][0]
    model, _ = M.load_model(folder)
    lora.add_lora(model, rank=2, alpha=4, targets=("wq", "w_down"))
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_b.normal_(std=0.05)
    adapted = model(IDS)
    lora.save_adapter(model, tmp_path, str(folder))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in saved
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "down_proj"] and config["r"] == 2
    reloaded, _ = M.load_model(tmp_path)  # an adapter folder: its base model, then the adapters
    assert torch.equal(reloaded(IDS), adapted)
    merged = lora.merge_lora(reloaded)
    assert not lora.lora_layers(merged)
    assert (merged(IDS) - adapted).abs().max() < 1e-5
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(M.ModelLoadError, match="adapter_model.safetensors"):
        M.load_model(tmp_path)


def test_grpo_with_lora_trains_only_adapters_resumes_and_exports(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    common = ("--lr", 1e-2, "--max-new-tokens", 5, "--group-size", 4, "--questions-per-step", 2, "--beta", 0.05,
              "--val-every", 2, "--save-every", 1, "--lora-rank", 4)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train.run(flags(ckpt, straight, "--steps", 3, *common, lora_alpha=8), repeat_task(tok))
    train.run(flags(ckpt, killed, "--steps", 1, *common, lora_alpha=8), repeat_task(tok))
    train.run(flags(ckpt, killed, "--steps", 3, "--resume", *common, lora_alpha=8), repeat_task(tok))
    files = {p.name for p in (straight / "checkpoint").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors"} <= files
    assert "model.safetensors" not in files  # adapters only
    for name in ("adapter_model.safetensors", "optimizer.safetensors"):
        a, b = load_file(straight / "checkpoint" / name), load_file(killed / "checkpoint" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert read_metrics(straight)[-1]["kl"] > 0  # the reference (adapters off) and the policy now differ

    adapted, _ = M.load_model(straight / "checkpoint")
    assert any(m.lora_b.abs().max() > 0 for m in lora.lora_layers(adapted))  # trained
    base, _ = M.load_model(ckpt)
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in adapted.named_parameters()
               if not n.endswith(("lora_a", "lora_b")))  # the base weights did not move
    dest = tmp_path / "merged"
    train.run(train.parse_args(["--out", str(straight), "--export-merged", str(dest)]))
    hf = AutoModelForCausalLM.from_pretrained(dest).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - adapted(IDS)).abs().max() < 1e-4


def test_micro_batches_give_the_same_update(tiny_checkpoints, tmp_path):
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    common = ("--lr", 1e-2, "--max-new-tokens", 6, "--group-size", 8, "--questions-per-step", 2, "--beta", 0.05,
              "--steps", 1, "--val-limit", 1)
    train.run(flags(ckpt, tmp_path / "whole", *common), repeat_task(tok))
    train.run(flags(ckpt, tmp_path / "chunks", *common, micro_batch=3, checkpointing=False), repeat_task(tok))
    a = load_file(tmp_path / "whole" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "chunks" / "checkpoint" / "model.safetensors")
    start = load_file(ckpt / "model.safetensors")
    assert max((a[k] - start[k]).abs().max() for k in a) > 1e-3  # the step moved the weights
    # AdamW divides by sqrt(v): a near-zero gradient summed in another order moves its weight by a visible share
    # of lr (1e-2 here); measured 9e-6 with F.linear rollouts, 1.7e-5 with the engine's (whose old log-probs
    # differ from the loss pass's by float32 rounding, so the ratio is 1 +- 1e-6 rather than bit-exact 1).
    assert max((a[k] - b[k]).abs().max() for k in a) < 5e-5
    # One AdamW step moves each weight by about lr * sign(gradient), whatever the gradient's scale: the
    # logged loss and gradient norm are what show that the chunks add up to the whole group's.
    whole, chunks = read_metrics(tmp_path / "whole")[1], read_metrics(tmp_path / "chunks")[1]
    for key in ("loss", "grad_norm", "kl", "clip_frac"):
        assert chunks[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    assert whole["grad_norm"] > 0


def test_compiled_blocks_compute_the_same_log_probs(tiny_checkpoints):
    model, _ = M.load_model(tiny_checkpoints["qwen3"][0])
    prompt, comps = [5, 6, 7, 8], [[9, 10, 11], [12, 13]]
    want, _ = losspass.completion_logprobs(model, prompt, comps)
    want_tokens = generate(model, [prompt], 6, temperature=0, stop_ids=())
    M.compile_blocks(model, backend="aot_eager", dynamic=True)  # inductor needs a C compiler; GPUs use it
    got, _ = losspass.completion_logprobs(model, prompt, comps)
    assert (got - want).abs().max() < 1e-5
    assert generate(model, [prompt], 6, temperature=0, stop_ids=()) == want_tokens


def torchrun(nproc: int, out: Path, *argv, settings: dict | None = None) -> None:
    """tests/ddp_worker.py under torchrun with train.py's flags `argv` and `settings` (train.parse_args's)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "ddp_worker.py"), "--settings", json.dumps(settings or {}), "--out", str(out),
           *map(str, argv)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_step(a: dict, b: dict, tol: float = 1e-6, lr: float = 1e-2) -> None:
    """Parameters after AdamW steps from gradients equal up to float summation order. Adam divides by
    sqrt(v) + 1e-8, so an element whose gradient is ~1e-8 can move by a visible part of lr on rounding
    noise alone: all but 0.1% of elements must agree to `tol` and every one to a tenth of lr.
    Unsynchronised gradients would differ by up to 2 lr on many elements."""
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > tol).float().mean() < 1e-3 and diffs.max() < 0.1 * lr, (diffs > tol).sum()


@pytest.mark.parametrize("mode", ["ddp", "ddp-lora", "fsdp", "fsdp-lora-ppo"])
def test_two_ranks_take_the_step_one_process_takes(tiny_checkpoints, tmp_path, mode, monkeypatch):
    """Same global batch (4 questions x G=8): 2 gloo ranks (DDP replicas or FSDP2 shards) vs one process;
    then the 2-rank checkpoint resumed by one process equals a one-process run of the same length."""
    if "fsdp" in mode:  # shards decode with F.linear and prefill each prompt whole, without shared segments
        # (engine.py, sampling.prefill): the one process does the same, or this tiny model's nearly flat
        # distributions sample other tokens
        monkeypatch.setattr(engine, "CPU_FAST_LAYOUT", False)
        prefill = sampling.prefill
        monkeypatch.setattr(sampling, "prefill", lambda m, p, n, share_prefix=True: prefill(m, p, n, share_prefix=False))
    ckpt = tiny_checkpoints["llama"][0]
    _, tok = M.load_model(ckpt)
    lora, ppo = 4 if "lora" in mode else 0, "ppo" in mode
    common = [str(x) for x in ("--model", ckpt, "--preset", "cpu", "--lr", 1e-2, "--max-new-tokens", 6,
                               "--group-size", 8, "--questions-per-step", 4, "--beta", 0.05,
                               "--val-limit", 3, "--lora-rank", lora, "--algo", "ppo" if ppo else "grpo",
                               "--critic-lr", 1e-2)]
    settings = dict(rollout_batch=2, lora_alpha=8)

    def one_process(out, steps, *extra):
        train.run(train.parse_args(["--out", str(out), "--steps", str(steps), *extra, *common], settings=settings),
                  repeat_task(tok))

    torchrun(2, tmp_path / "two", "--steps", 1, *common, *(["--fsdp"] if "fsdp" in mode else []), settings=settings)
    one_process(tmp_path / "one", 1)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a = load_file(tmp_path / "one" / "checkpoint" / name)
    b = load_file(tmp_path / "two" / "checkpoint" / name)
    if lora:  # B starts at zero
        assert max(a[k].abs().max() for k in a if "lora_B" in k) > 1e-3  # the step moved the adapters
    else:
        start = load_file(ckpt / "model.safetensors")
        assert max((a[k] - start[k]).abs().max() for k in a) > 1e-3  # the step moved the weights
    assert_same_step(a, b)
    if ppo:  # the critic's step too (its value head starts at zero)
        a, b = (load_file(tmp_path / run / "checkpoint" / "critic.safetensors") for run in ("one", "two"))
        assert a["value_head.weight"].abs().max() > 1e-3
        assert_same_step(a, b)
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("reward", "response_len", "kl", "loss", "grad_norm", "val_reward"):
        assert m1[1][key] == pytest.approx(m2[1][key], rel=1e-4, abs=1e-6), key
    if lora:
        return
    one_process(tmp_path / "two", 2, "--resume")  # the 2-rank checkpoint, continued by one process
    one_process(tmp_path / "one2", 2)
    a, b = load_file(tmp_path / "one2" / "checkpoint" / name), load_file(tmp_path / "two" / "checkpoint" / name)
    assert_same_step(a, b, tol=1e-5)  # two steps: the first step's rounding differences carried along
