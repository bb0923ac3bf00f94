"""The Memory Manager run over a conversation: each turn's facts and the memories they relate to go into the
update-memory prompt, and the events the manager answers edit the speaker's bank (paper Alg. 1;
docs/method.md section 1).

    banks = run_manager(conv, facts, model, tok, embedder)       # one MemoryBank per speaker
    banks = run_managers(convs, facts, model, tok, embedder)     # many conversations, their calls batched

For each fact of a turn, the top-k related memories of the speaker's bank (deduplicated, ids renamed "0",
"1", ... as Mem0 does) are shown; the manager answers in its format (prompts.py: Mem0's {"memory": [events]},
or "ops", the decision first); the events are applied to a copy of the bank (memory.MemoryBank.apply).
Malformed output is applied as far as it is valid and counted, never a crash.
On the gym (data/gym.py) the right operations are known: oracle_banks applies them, and `decision` names
what a list of applied operations did (ADD, UPDATE, DELETE, NONE), so a manager's choice can be compared
with the oracle's.
Used by agents.py (the RL environment and the Answer Agent's banks) and evaluate.py. Read next: decision.py (the manager's small-model recipe).
"""

from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

from decision import force_arm, greedy_guides
from grammar import guide_for
from memory import FactRecord, HashEmbedder, MemoryBank, add_all_banks
from prompts import decision_marker, manager_format_automaton, manager_messages, parse_manager_output
from sampling import generate


OPS = ("ADD", "UPDATE", "DELETE", "NONE")


def related_memories(bank: MemoryBank, facts: list[str], k: int = 5) -> tuple[list[dict], dict[str, str]]:
    """Top-k memories per fact, deduplicated in order, renamed "0", "1", ...; returns (shown, id_map)."""
    seen = {}
    for fact in facts:
        for m in bank.search(fact, k):
            seen.setdefault(m["id"], m["text"])
    shown = [{"id": str(i), "text": text} for i, text in enumerate(seen.values())]
    return shown, {str(i): mid for i, mid in enumerate(seen)}


def apply_output(bank: MemoryBank, text: str, id_map: dict[str, str], facts: list[FactRecord],
                 fmt: str = "mem0") -> tuple[MemoryBank, dict]:
    """A copy of `bank` with the manager's output (for these facts, in format `fmt`) applied, and the counts
    (ADD ... invalid, parse_fail, recovered)."""
    shown = [{"id": s, "text": bank.memories[real].text} for s, real in id_map.items()
             if real in bank.memories] if fmt == "ops" else []  # the ops format names memories by their text
    parsed = parse_manager_output(text, [f.text for f in facts], fmt, shown)
    edited, fact = bank.copy(), facts[0]
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


def oracle_banks(conv, embedder=None, before: str | None = None) -> dict[str, MemoryBank]:
    """The gym's banks with the correct events of every fact turn applied in order (up to turn `before`)."""
    banks = add_all_banks(conv, [], embedder or HashEmbedder())
    for turn in conv.turns():
        if turn.dia_id == before:
            break
        apply_oracle(banks, conv, turn)
    return banks


def apply_oracle(banks: dict[str, MemoryBank], conv, turn) -> None:
    """The oracle's events of one turn (none for small talk) applied to its speaker's bank, in place."""
    if turn.dia_id in conv.oracle:
        date = next(s.date_text for s in conv.sessions if s.index == turn.session)
        banks[turn.speaker].apply(conv.oracle[turn.dia_id]["events"], speaker=turn.speaker, timestamp=date,
                                  dia_ids=[turn.dia_id])


def decision(log: list[dict]) -> tuple[str, frozenset]:
    """What a list of applied operations (MemoryBank.log entries) does, as one of ADD, UPDATE, DELETE, NONE
    (or MIXED) and the bank ids it changes. DELETE m plus ADD counts as UPDATE m: the memory is replaced."""
    ops = {"ADD": set(), "UPDATE": set(), "DELETE": set()}
    for entry in log:
        ops[entry["op"]].add(entry["id"])
    touched = frozenset(ops["UPDATE"] | ops["DELETE"])
    if not any(ops.values()):
        return "NONE", frozenset()
    if not touched:
        return "ADD", frozenset()
    if ops["UPDATE"] and not ops["DELETE"] and not ops["ADD"]:
        return "UPDATE", touched
    if ops["DELETE"] and not ops["UPDATE"]:
        return ("UPDATE" if ops["ADD"] else "DELETE"), touched
    return "MIXED", touched


def oracle_decision(conv, dia_id: str) -> tuple[str, frozenset]:
    """The decision of the oracle's events for a fact turn of the gym, in the terms of `decision`."""
    return decision([{"op": e["event"], "id": e["id"]} for e in conv.oracle[dia_id]["events"] if e["event"] != "NONE"])


def oracle_kind(conv, dia_id: str, facts: list[FactRecord]) -> str:
    """A gym fact turn's right decision: ADD (a new fact), UPDATE change (the fact replaces a memory's value),
    UPDATE merge (a set grows: the memory becomes a merged text), DELETE (a retraction), NONE (a restatement)."""
    target = next((e for e in conv.oracle[dia_id]["events"] if e["event"] != "ADD"), None)
    if target is None:
        return "ADD"
    if target["event"] == "UPDATE":
        return "UPDATE change" if target.get("text") == facts[0].text else "UPDATE merge"
    return target["event"]


def oracle_arm(conv, dia_id: str, facts: list[FactRecord], keep_sets: bool = False) -> bool:
    """Whether the gym's right first decision in the ops format is "new" for this call (a new fact, ADD), rather
    than naming a shown memory (UPDATE, DELETE, NONE). keep_sets: "new" also when a set grows (the oracle's
    UPDATE merges the fact into the set's memory; "new" stores the fact beside the set instead, which keeps every
    member where the frozen LM's merge text would not)."""
    kind = oracle_kind(conv, dia_id, facts)
    return kind == "ADD" or (keep_sets and kind == "UPDATE merge")


def run_manager(conv, facts: list[FactRecord], model, tok, embedder=None, k: int = 5, max_new_tokens: int = 256,
                stats: dict | None = None, progress: bool = True, guided: bool = False,
                fmt: str = "mem0") -> dict[str, MemoryBank]:
    """Build one bank per speaker by running the manager greedily over the facts, turn by turn, in order.

    Malformed output is applied as far as it is valid and counted in stats (parse_fail, invalid, ops). On the
    gym, each decision is compared with the oracle's kind of operation for the turn (the banks differ, so ids
    are not compared): stats["decisions"][oracle kind][manager's kind] counts them.
    """
    return run_managers([conv], [facts], model, tok, embedder, k, max_new_tokens, stats, progress, guided, fmt)[0]


def run_managers(convs: list, facts: list[list[FactRecord]], model, tok, embedder=None, k: int = 5,
                 max_new_tokens: int = 256, stats: dict | list | None = None, progress: bool = True,
                 guided: bool = False, fmt: str = "mem0", arm=None) -> list[dict[str, MemoryBank]]:
    """run_manager for several conversations at once: each conversation's calls are sequential (each edits the
    bank the next one reads), but the conversations are independent, so their n-th calls share one batch.
    arm (the gym, the ops format): a function (conv, dia_id, facts) -> "new"?, e.g. oracle_arm, that makes each
    call's first decision instead of the model's head (evaluate.py --manager-arm). stats: one dict for every
    conversation's counts, or a list of one per conversation (evaluate.py keeps each with its banks)."""
    per_conv = stats if isinstance(stats, list) else [stats if stats is not None else {}] * len(convs)
    runs = [manager_calls(c, f, model, tok, embedder, k, st, guided, fmt, arm) for c, f, st in zip(convs, facts, per_conv)]
    banks, asks = [None] * len(runs), {}
    for i, run in enumerate(runs):
        advance(run, i, None, asks, banks)
    total = sum(len(facts_by_turn(f)) for f in facts)
    with tqdm(total=total, desc="manager calls", disable=not progress, leave=False) as bar:
        while asks:
            order = list(asks)
            prompts, guides = [asks[i][0] for i in order], [asks[i][1] for i in order]
            if arm is None and getattr(model, "decision_head", None) is not None:  # the head's decision (decision.py)
                guides = greedy_guides(model, prompts, guides, decision_marker(tok))
            outs = generate(model, prompts, max_new_tokens, temperature=0, guide=guides)
            for i, out in zip(order, outs):
                advance(runs[i], i, tok.decode(out), asks, banks)
            bar.update(len(order))
    return banks


def advance(run, i: int, output, asks: dict, banks: list) -> None:
    """Send a conversation's last output to its manager_calls generator: it asks its next call or finishes."""
    try:
        asks[i] = next(run) if output is None else run.send(output)
    except StopIteration as done:
        asks.pop(i, None)
        banks[i] = done.value


def manager_calls(conv, facts: list[FactRecord], model, tok, embedder, k: int, stats: dict, guided: bool, fmt: str,
                  arm=None):
    """One conversation's manager run as a generator: it yields (prompt, guide) for each call, receives the
    manager's output text, applies it, and finally returns the banks (run_managers batches the calls)."""
    banks = add_all_banks(conv, [], embedder or HashEmbedder())  # one empty bank per speaker
    grouped = facts_by_turn(facts)
    by_turn = [(t, grouped[t.dia_id]) for t in conv.turns() if t.dia_id in grouped]
    # facts without an evidence id naming a turn of the conversation (one in LoCoMo) have no place in the order
    stats["orphan_facts"] = stats.get("orphan_facts", 0) + len(facts) - sum(len(fs) for _, fs in by_turn)
    for turn, turn_facts in by_turn:
        for speaker in dict.fromkeys(f.speaker for f in turn_facts if f.speaker in banks):
            mine = [f for f in turn_facts if f.speaker == speaker]
            bank = banks[speaker]
            shown, id_map = related_memories(bank, [f.text for f in mine], k)
            if not shown:  # an empty bank: nothing to compare with, every fact is new (Mem0 does the same)
                for f in mine:
                    bank.add(f.text, speaker=f.speaker, timestamp=f.timestamp, dia_ids=f.dia_ids)
                stats["ADD"] = stats.get("ADD", 0) + len(mine)
                continue
            prompt = tok.chat(manager_messages(shown, [f.text for f in mine], fmt))
            shape = guide_for(manager_format_automaton(fmt, shown, len(mine)), model, tok, guided)
            if arm is not None:  # the first decision made for the model (the gym's fact turns all have an oracle)
                shape = force_arm(prompt, shape, decision_marker(tok), arm(conv, turn.dia_id, mine))
            output = yield prompt, shape
            banks[speaker], counts = apply_output(bank, output, id_map, mine, fmt)
            for key, v in counts.items():
                stats[key] = stats.get(key, 0) + int(v)
            if turn.dia_id in conv.oracle:
                right, made = oracle_decision(conv, turn.dia_id)[0], decision(banks[speaker].log[len(bank.log):])[0]
                table = stats.setdefault("decisions", {}).setdefault(right, {})
                table[made] = table.get(made, 0) + 1
    return banks
