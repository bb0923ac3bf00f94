"""The Memory Manager: running it over a conversation, and its RL environment (paper Alg. 1, SPEC section 1).

    banks = run_manager(conv, facts, model, tok, embedder)       # one bank per speaker, built by a manager
    task = manager_task(args, tok, base_model)                   # train.py --agent manager

One manager step: the facts of one turn, and for each fact its top-k related memories of the speaker's
bank (deduplicated, ids renamed "0", "1", ... as Mem0 does), go into the update-memory prompt; the
manager answers {"memory": [events]}; the events are applied to that bank.

The RL environment (choices the paper leaves open, each a train.py flag):
  - examples: every turn of the conversation that is evidence for at least one question, with those
    questions; turns for which the fact source has no fact are skipped (nothing to manage);
  - state: banks built from the facts of the preceding `window` turns (default 24; 0 = the whole history),
    every fact ADDed (snapshot builder "add-all": offline, deterministic, no second model);
  - the manager edits the bank of the turn's speaker; the other speaker's bank stays as it is;
  - reward: a frozen Answer Agent answers each linked question greedily from the edited banks (k + k
    retrieval), reward = mean EM (flag: F1). Output from which no event list can be recovered scores 0
    and counts as a parse failure; recovered but malformed output is applied as far as it is valid.
"""

from __future__ import annotations

from collections import defaultdict

import model as M
from memory import (FactRecord, HashEmbedder, MemoryBank, add_all_banks, conversation_facts, make_embedder,
                    speaker_memories)
from prompts import answer_messages, manager_messages, parse_manager

OPS = ("ADD", "UPDATE", "DELETE", "NONE")


def related_memories(bank: MemoryBank, facts: list[str], k: int = 5) -> tuple[list[dict], dict[str, str]]:
    """Top-k memories per fact, deduplicated in order, renamed "0", "1", ...; returns (shown, id_map)."""
    seen = {}
    for fact in facts:
        for m in bank.search(fact, k):
            seen.setdefault(m["id"], m["text"])
    shown = [{"id": str(i), "text": text} for i, text in enumerate(seen.values())]
    return shown, {str(i): mid for i, mid in enumerate(seen)}


def apply_output(bank: MemoryBank, text: str, id_map: dict[str, str], fact: FactRecord) -> tuple[MemoryBank, dict]:
    """A copy of `bank` with the manager's output applied, and the counts (ADD ... invalid, parse_fail)."""
    parsed = parse_manager(text)
    edited = bank.copy()
    counts = edited.apply(parsed.value, id_map, speaker=fact.speaker, timestamp=fact.timestamp,
                          dia_ids=fact.dia_ids)
    counts["parse_fail"] = int(not parsed.ok)
    counts["recovered"] = bool(parsed.value) or parsed.ok  # False: nothing usable came out
    return edited, counts


def facts_by_turn(facts: list[FactRecord]) -> dict[str, list[FactRecord]]:
    """dia_id of a fact's first evidence turn -> its facts, in order."""
    out = defaultdict(list)
    for f in facts:
        if f.dia_ids:
            out[f.dia_ids[0]].append(f)
    return out


def run_manager(conv, facts: list[FactRecord], model, tok, embedder=None, k: int = 5, max_new_tokens: int = 256,
                stats: dict | None = None, progress: bool = True) -> dict[str, MemoryBank]:
    """Build one bank per speaker by running the manager greedily over the facts, turn by turn, in order.

    Malformed output is applied as far as it is valid and counted in stats (parse_fail, invalid, ops).
    """
    from tqdm import tqdm

    stats = stats if stats is not None else {}
    banks = add_all_banks(conv, [], embedder or HashEmbedder())  # one empty bank per speaker
    grouped = facts_by_turn(facts)
    by_turn = [(t, grouped[t.dia_id]) for t in conv.turns() if t.dia_id in grouped]
    # facts without an evidence id naming a turn of the conversation (one in LoCoMo) have no place in the order
    stats["orphan_facts"] = stats.get("orphan_facts", 0) + len(facts) - sum(len(fs) for _, fs in by_turn)
    for turn, turn_facts in tqdm(by_turn, desc=f"manager {conv.sample_id}", disable=not progress, leave=False):
        for speaker in dict.fromkeys(f.speaker for f in turn_facts if f.speaker in banks):
            mine = [f for f in turn_facts if f.speaker == speaker]
            bank = banks[speaker]
            shown, id_map = related_memories(bank, [f.text for f in mine], k)
            if not shown:  # an empty bank: nothing to compare with, every fact is new (Mem0 does the same)
                for f in mine:
                    bank.add(f.text, speaker=f.speaker, timestamp=f.timestamp, dia_ids=f.dia_ids)
                stats["ADD"] = stats.get("ADD", 0) + len(mine)
                continue
            prompt = tok.chat(manager_messages(shown, [f.text for f in mine]))
            out = M.generate(model, [prompt], max_new_tokens, temperature=0)[0]
            banks[speaker], counts = apply_output(bank, tok.decode(out), id_map, mine[0])
            for key, v in counts.items():
                stats[key] = stats.get(key, 0) + int(v)
    return banks


def manager_examples(conv, questions, facts: list[FactRecord], tok, embedder, window: int = 24, k: int = 5):
    """The RL states of one conversation (see the module docstring): train.Example objects."""
    from train import Example

    by_turn, turns = facts_by_turn(facts), conv.turns()
    linked = defaultdict(list)
    for q in questions:
        for dia_id in q.evidence:
            linked[dia_id].append(q)
    out = []
    for i, turn in enumerate(turns):
        mine = [f for f in by_turn.get(turn.dia_id, []) if f.speaker == turn.speaker]
        if not linked.get(turn.dia_id) or not mine:
            continue
        earlier = turns[max(0, i - window) if window else 0:i]
        banks = add_all_banks(conv, [f for t in earlier for f in by_turn.get(t.dia_id, [])], embedder)
        shown, id_map = related_memories(banks[turn.speaker], [f.text for f in mine], k)
        prompt = tok.chat(manager_messages(shown, [f.text for f in mine]))
        meta = {"conv": conv, "banks": banks, "speaker": turn.speaker, "id_map": id_map, "facts": mine,
                "questions": linked[turn.dia_id], "dia_id": turn.dia_id}
        out.append(Example(prompt, "", meta))
    return out


def manager_task(args, tok, base_model):
    """train.py's Task for --agent manager: examples from the train and val conversations, and the reward."""
    from data.locomo import load_conversations, load_split
    from train import Task

    embedder = make_embedder(args.embedder, base_model, tok)
    dtype, dev = base_model.lm_head.weight.dtype, base_model.lm_head.weight.device
    answerer = M.load_model(args.answerer or args.model, dtype, dev)[0]  # its own copy: the policy will change
    answerer.requires_grad_(False)
    convs = {c.sample_id: c for c in load_conversations()}

    def examples(split):
        qs = load_split(split)
        out = []
        for conv_id in dict.fromkeys(q.conv_id for q in qs):
            conv = convs[conv_id]
            facts = conversation_facts(conv, args.facts, base_model, tok)
            out += manager_examples(conv, [q for q in qs if q.conv_id == conv_id], facts, tok, embedder,
                                    args.window, args.manager_k)
        return out

    return Task(examples("train"), examples("val"), lambda ex, texts: manager_score(ex, texts, answerer, tok, args))


def manager_score(example, texts: list[str], answerer, tok, args) -> list[dict]:
    """Reward of each manager output: apply it to a copy of the bank, let the frozen answerer answer the
    turn's linked questions greedily (k + k retrieval), mean EM (or F1); plus the event mix and bank size."""
    from train import score_answer

    meta, k = example.meta, args.memories_per_speaker
    conv, questions = meta["conv"], meta["questions"]
    results, prompts = [], []
    for text in texts:
        edited, counts = apply_output(meta["banks"][meta["speaker"]], text, meta["id_map"], meta["facts"][0])
        banks = {**meta["banks"], meta["speaker"]: edited}
        results.append((counts, len(edited)))
        if counts["recovered"]:
            for q in questions:
                mems_a, mems_b = speaker_memories(conv, banks, q.question, k)
                msgs = answer_messages(q.question, conv.speaker_a, mems_a, conv.speaker_b, mems_b,
                                       distill=not args.no_distill)
                prompts.append(tok.chat(msgs))
    answers = []
    for i in range(0, len(prompts), args.val_batch):
        answers += M.generate(answerer, prompts[i:i + args.val_batch], args.answer_max_new_tokens, temperature=0)
    out, pos = [], 0
    for counts, size in results:
        n_events = sum(counts[op] for op in OPS) + counts["invalid"]
        row = {"reward": 0.0, "em": 0.0, "f1": 0.0, "parse_fail": float(counts["parse_fail"])}
        if counts["recovered"]:
            scored = [score_answer(tok.decode(answers[pos + j]), q.answer, args.reward, args.require_marker)
                      for j, q in enumerate(questions)]
            pos += len(questions)
            for key in ("reward", "em", "f1"):
                row[key] = sum(s[key] for s in scored) / len(scored)
        row.update({op.lower(): counts[op] / max(n_events, 1) for op in OPS})
        row.update({"invalid_events": counts["invalid"] / max(n_events, 1), "bank_size": float(size)})
        out.append(row)
    return out
