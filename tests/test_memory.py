"""memory.py: the bank's operations, search against a brute-force reference, apply(), persistence."""

import json

import numpy as np
import pytest

from memory import HashEmbedder, MemoryBank


def test_hash_embedder_is_deterministic_unit_and_semantic():
    e = HashEmbedder()
    a = e(["Melanie adopted a dog named Buddy", "Melanie adopted a dog named Buddy", "The stock market fell"])
    assert a.shape == (3, 512) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.array_equal(a[0], a[1])
    q = e(["What dog did Melanie adopt?"])[0]
    assert q @ a[0] > q @ a[2] + 0.1


def test_add_update_delete_and_search_order():
    bank = MemoryBank()
    ids = [bank.add(t, speaker="Melanie", timestamp="8 May 2023") for t in
           ["Melanie adopted a dog named Buddy", "Melanie likes pottery", "Melanie ran a charity race"]]
    assert len(bank) == 3
    top = bank.search("Which dog did Melanie adopt?", k=2)
    assert [m["id"] for m in top][0] == ids[0] and len(top) == 2
    assert top[0]["score"] >= top[1]["score"]
    bank.apply([{"id": "0", "event": "UPDATE", "text": "Melanie adopted two dogs, Buddy and Scout"}], {"0": ids[0]},
               speaker="Melanie", timestamp="2 June 2023", dia_ids=["D2:1"])
    assert bank.memories[ids[0]].text == "Melanie adopted two dogs, Buddy and Scout"
    assert bank.memories[ids[0]].timestamp == "2 June 2023"  # dated by the update, as Mem0 does
    bank.update(ids[2], "Melanie ran two charity races")
    assert bank.memories[ids[2]].timestamp == "8 May 2023"  # no date given: it keeps its own
    assert bank.search("Scout", k=1)[0]["id"] == ids[0]
    bank.delete(ids[1])
    assert len(bank) == 2 and ids[1] not in bank
    assert {m["id"] for m in bank.search("pottery", k=10)} == {ids[0], ids[2]}
    assert [e["op"] for e in bank.log] == ["ADD", "ADD", "ADD", "UPDATE", "UPDATE", "DELETE"]


def test_search_equals_brute_force_after_many_operations():
    """After adds, deletes (which move rows) and updates, each result is the memory it names, with that
    memory's own cosine, and the k results are the brute-force top k (any order among equal scores)."""
    rng = np.random.default_rng(0)
    words = ["dog", "cat", "paint", "race", "beach", "camp", "book", "music", "school", "friend", "pottery"]
    bank = MemoryBank()
    for i in range(300):
        bank.add(" ".join(rng.choice(words, 4)) + f" {i}")
    for mid in list(bank.memories)[::3]:
        bank.delete(mid)
    for mid in list(bank.memories)[::5]:
        bank.update(mid, "updated " + " ".join(rng.choice(words, 3)))
    query, k = "dog beach friend", 25
    got = bank.search(query, k=k)
    e = bank.embedder
    q = e([query])[0]
    score_of = {mid: float(e([m.text])[0] @ q) for mid, m in bank.memories.items()}  # brute force, by id
    assert len(got) == k and len({m["id"] for m in got}) == k
    for m in got:
        assert m["text"] == bank.memories[m["id"]].text
        assert m["score"] == pytest.approx(score_of[m["id"]], abs=1e-5)
    assert [m["score"] for m in got] == sorted([m["score"] for m in got], reverse=True)
    best = sorted(score_of.values(), reverse=True)
    assert [m["score"] for m in got] == pytest.approx(best[:k], abs=1e-5)
    left_out = set(score_of) - {m["id"] for m in got}
    assert max(score_of[mid] for mid in left_out) <= got[-1]["score"] + 1e-5


def test_unknown_id_and_empty_text_are_refused_and_change_nothing():
    bank = MemoryBank()
    mid = bank.add("Caroline paints sunsets")
    before = (dict(bank.memories), list(bank.log))
    with pytest.raises(KeyError, match="no memory with id '99'"):
        bank.update("99", "x")
    with pytest.raises(KeyError, match="no memory with id '99'"):
        bank.delete("99")
    with pytest.raises(ValueError, match="non-empty string"):
        bank.update(mid, "   ")
    with pytest.raises(ValueError, match="non-empty string"):
        bank.add(None)
    assert (dict(bank.memories), list(bank.log)) == before
    assert bank.memories[mid].text == "Caroline paints sunsets"


def test_apply_counts_and_skips_invalid_events():
    bank = MemoryBank()
    a = bank.add("Melanie adopted a dog named Buddy")
    b = bank.add("Melanie is vegetarian")
    id_map = {"0": a, "1": b}
    events = [
        {"id": "0", "text": "Melanie adopted two dogs, Buddy and Scout", "event": "UPDATE", "old_memory": "..."},
        {"id": "1", "text": "Melanie is vegetarian", "event": "DELETE"},
        {"id": "2", "text": "Melanie went camping in July", "event": "ADD"},
        {"id": "0", "text": "Melanie adopted two dogs, Buddy and Scout", "event": "NONE"},
        {"id": "7", "text": "ghost", "event": "UPDATE"},  # unknown id
        {"id": "2", "text": "", "event": "ADD"},  # empty text
        {"id": "0", "text": 5, "event": "UPDATE"},  # wrong type
        {"id": "0", "event": "MERGE"},  # unknown event
        "not a dict",
    ]
    counts = bank.apply(events, id_map)
    assert counts == {"ADD": 1, "UPDATE": 1, "DELETE": 1, "NONE": 1, "invalid": 5}
    assert sorted(m.text for m in bank.memories.values()) == ["Melanie adopted two dogs, Buddy and Scout",
                                                               "Melanie went camping in July"]
    assert bank.apply("garbage") == {"ADD": 0, "UPDATE": 0, "DELETE": 0, "NONE": 0, "invalid": 0}


def test_save_and_load_round_trip(tmp_path):
    bank = MemoryBank()
    for t in ["a dog named Buddy", "a cat named Tom", "pottery class"]:
        bank.add(t, speaker="Melanie", timestamp="8 May 2023", dia_ids=["D1:2"])
    bank.delete("1")
    path = tmp_path / "bank.json"
    bank.save(path)
    assert not (tmp_path / "bank.json.tmp").exists()
    back = MemoryBank.load(path)
    assert back.memories == bank.memories and back.log == bank.log
    assert back.search("dog", 2) == bank.search("dog", 2)
    assert back.add("new one") == "3"  # ids keep counting after a reload
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not a memory bank file"):
        MemoryBank.load(path)
    bank.save(path)
    state = json.loads(path.read_text())
    state["embedder"] = "model-last"
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="saved with embedder model-last"):
        MemoryBank.load(path)


def test_growth_keeps_every_vector():
    """1,000 adds, one at a time, through six doublings of the matrix: every memory is still found by its own
    text, with cosine 1."""
    bank = MemoryBank(HashEmbedder(dim=64))
    texts = [f"memory number {i}" for i in range(1000)]
    ids = [bank.add(t) for t in texts]
    assert len(bank) == 1000 and bank._vecs.shape[0] >= 1000
    for mid, text in zip(ids, texts):
        top = bank.search(text, 1)[0]
        assert top["id"] == mid and top["score"] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ embedders and fact sources with real models

import torch  # noqa: E402

import model as M  # noqa: E402
from agents import conversation_facts  # noqa: E402
from data.locomo import Conversation, Session, Turn, load_conversations  # noqa: E402
from memory import ModelEmbedder, add_all_banks  # noqa: E402


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_model_embedder_pools_transformers_hidden_states(tiny_checkpoints, pooling):
    folder, hf = tiny_checkpoints["qwen3"]
    net, tok = M.load_model(folder)
    texts = ["Melanie adopted a dog", "a much longer sentence about pottery and painting classes", "x"]
    got = ModelEmbedder(net, tok, pooling=pooling, batch_size=2)(texts)  # batches mix lengths: left padding
    for row, text in zip(got, texts):
        with torch.no_grad():
            h = hf.model(input_ids=torch.tensor([tok.encode(text)])).last_hidden_state[0]  # [T, dim], normed
        want = h[-1] if pooling == "last" else h.mean(0)
        want = (want / want.norm()).numpy()
        assert np.allclose(row, want, atol=1e-4)


def tiny_conversation():
    turns = [Turn("D1:1", "Melanie", "I adopted a dog named Buddy last week!", 1, None),
             Turn("D1:2", "Caroline", "That's great. I started a pottery class.", 1, None)]
    return Conversation("conv-x", "Melanie", "Caroline", [Session(1, None, "8 May 2023", turns)], [], [])


def test_fact_sources_observation_and_turn():
    conv = load_conversations()[0]
    obs = conversation_facts(conv, "observation")
    turns = conversation_facts(conv, "turn")
    assert len(obs) == len(conv.observations) and len(turns) == len(conv.turns())
    assert turns[0].dia_ids == ["D1:1"] and turns[0].timestamp == "1:56 pm on 8 May, 2023"
    banks = add_all_banks(conv, obs)
    assert set(banks) == {"Caroline", "Melanie"}
    assert sum(len(b) for b in banks.values()) == len(obs)
    with pytest.raises(ValueError, match="unknown fact source 'summary'"):
        conversation_facts(conv, "summary")
    with pytest.raises(ValueError, match="needs a model"):
        conversation_facts(conv, "llm")


def test_llm_fact_source_counts_garbage_from_a_random_model(tiny_checkpoints):
    net, tok = M.load_model(tiny_checkpoints["llama"][0])
    stats = {}
    facts = conversation_facts(tiny_conversation(), "llm", net, tok, max_new_tokens=12, stats=stats)
    assert stats["parse_failures"] == 2 and facts == []  # random weights never write {"facts": [...]}


def test_llm_fact_source_with_smollm2(smollm2_path):
    """The real model extracts facts from at least one of the two turns, and one of them names what the
    turn says (Buddy the dog); every fact keeps the turn it came from, its speaker and the session's date."""
    net, tok = M.load_model(smollm2_path)
    stats = {}
    conv = tiny_conversation()
    facts = conversation_facts(conv, "llm", net, tok, max_new_tokens=64, stats=stats)
    assert facts and stats["parse_failures"] < 2
    speaker_of = {t.dia_id: t.speaker for t in conv.turns()}
    for f in facts:
        assert len(f.dia_ids) == 1 and f.speaker == speaker_of[f.dia_ids[0]] and f.timestamp == "8 May 2023"
    assert any("Buddy" in f.text or "dog" in f.text for f in facts if f.dia_ids == ["D1:1"])
    assert all(f.text.strip() and f.dia_ids[0] in ("D1:1", "D1:2") and f.timestamp == "8 May 2023" for f in facts)
