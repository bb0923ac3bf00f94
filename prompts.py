"""The three prompts of Memory-R1 (docs/method.md section 1) and parsers for their outputs that never raise.

    facts_messages(turn_text, date)             -> chat messages; the model answers {"facts": [...]}
    manager_messages(memories, facts, fmt)      -> chat messages; the model answers {"memory": [events]}
                                                   (fmt "mem0": Mem0's events; "ops": one decision per fact)
    answer_messages(question, a, mems_a, b, mems_b, distill=True)
                                                -> chat messages; the model answers ... **Answer:** x
    parse_facts / parse_manager / parse_answer  -> Parsed(value, ok, error)
    parse_manager_ops(text, facts)              -> Parsed(Mem0-style events): the "ops" format's decisions
    facts_automaton() / manager_automaton(n_ids) / manager_ops_automaton(n_shown, n_facts) / answer_automaton(distill)
                                                -> the formats as automata for guided decoding (grammar.py)

The prompts follow Mem0's fact-extraction, update-memory and LoCoMo answer prompts in substance (the
paper reuses them); the answer prompt adds Memory-R1's two rules: list the useful memories first
(memory distillation), then the final answer after `**Answer:**`. Model output is often malformed
(code fences, prose around the JSON, cut off at the token limit, wrong types): the parsers recover
what they can and say so in `ok` / `error`, so callers count failures instead of crashing.
Read next: metrics.py.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field

from grammar import Automaton, alt, byte_in, lit, opt, seq, star

# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

FACTS_SYSTEM = """You extract personal facts from one turn of a conversation, for a long-term memory.

Keep what is worth remembering about the speaker or people they mention: events and when they happened,
plans, preferences, relationships, possessions, places, jobs, hobbies, health, opinions. Write each fact
as a short self-contained sentence that names the person ("Melanie adopted a dog named Buddy"), and turn
relative dates into absolute ones using the turn's date. Skip greetings and small talk.

Answer with JSON only, in this shape: {"facts": ["fact one", "fact two"]}. With nothing worth keeping,
answer {"facts": []}.

Example
Turn (8 May 2023) Caroline: I went to an LGBTQ support group yesterday, it was so powerful!
{"facts": ["Caroline attended an LGBTQ support group on 7 May 2023", "Caroline found the support group powerful"]}"""

MANAGER_SYSTEM = """You are the manager of a memory. Compare newly retrieved facts with the existing
memories and decide, for each memory and each fact, one of four operations:

- ADD: the fact is new information: add it as a new memory (give it a new id).
- UPDATE: the fact adds detail to, or refines, an existing memory: keep that memory's id and write the
  merged text. Example: memory "Melanie adopted a dog named Buddy" + fact "Melanie adopted another dog,
  Scout" -> UPDATE to "Melanie adopted two dogs, Buddy and Scout".
- DELETE: the fact contradicts an existing memory: delete that memory.
- NONE: the fact is already there, or says the same thing: leave the memory as it is.

Answer with JSON only, in this shape:
{"memory": [{"id": "0", "text": "...", "event": "ADD|UPDATE|DELETE|NONE", "old_memory": "..."}]}
List every existing memory with its id and event (NONE if unchanged), and new memories with new ids.
For UPDATE, put the previous text in "old_memory". Write nothing outside the JSON."""

# The "ops" format (the cpu preset's manager; docs/method.md section 9): decisions first, texts by reference. For each
# new fact, in order, the manager names the memory the fact is about ("new" for none), then what to do with
# it. Only a merge writes text; ADD stores the fact's own text and UPDATE replaces the memory with it. A
# 135M model's free-written memories are rarely usable, and its prior names the right memory on most
# changes (docs/method.md section 9), so every choice it makes is a handful of tokens that outcome reward can rank.
MANAGER_OPS_SYSTEM = """You are the manager of a memory. For each new fact, in order, first copy the existing
memory it is about, or write "new" when no memory is about the same thing, then say what to do:

- "about": the text of the memory about the same person and the same thing as the fact, then one event:
  - UPDATE: the fact changes that memory's value ("Alice lives in Paris" + "Alice moved to Rome"): the fact
    replaces the memory.
  - MERGE: the fact adds to a list in that memory ("Alice has a dog named Buddy" + "Alice got another dog
    named Scout"): write the merged memory in "text" ("Alice has dogs named Buddy and Scout").
  - DELETE: the fact says that memory is no longer true ("Alice sold her car, no car now"): it is removed.
  - NONE: the memory already says the same thing: nothing changes.
- "about": "new" when no memory is about the same thing; then "event": "ADD" stores the fact as a new memory.

Answer with JSON only, one entry per fact, in this shape:
{"memory": [{"fact": 0, "about": "Alice lives in Paris", "event": "UPDATE"}, {"fact": 1, "about": "new", "event": "ADD"}]}"""

# Worked examples, shown to the "ops" manager as earlier turns of the chat (few-shot): (memories shown, fact,
# "about", event). Without them the 135M base model's P("new") at the first decision says nothing about the
# state (AUC 0.33, ADD against change states: it names a memory almost everywhere); with them it leans the
# right way (AUC 0.67 on val; bench/manager_priors.py, docs/manager.md).
# They mirror the gym's kinds of turn, hard cases included (a new fact about somebody's sister, beside the
# speaker's own memory of the same attribute), alternating, the memory to change shown first or second (with it
# always first, the greedy base model was right on 0.39 of the val UPDATE turns, alternated 0.56), with people
# and values of their own.
MANAGER_OPS_DEMOS = (
    (("Maria works as a pilot", "Maria speaks Italian"), "Maria lives in Oslo", "new", "ADD"),
    (("Omar drives a Ford", "Omar lives in Lima"), "Omar moved from Lima to Quito on 3 May 2023", "Omar lives in Lima",
     "UPDATE"),
    (("Lena works as a chef", "Lena has a cat named Tom"), "Lena's sister works as a nurse", "new", "ADD"),
    (("Kofi drives a Jeep", "Kofi enjoys running"), "Kofi sold the Jeep and now drives a Mazda", "Kofi drives a Jeep",
     "UPDATE"),
    (("Ana's favourite food is ramen", "Ana lives in Cairo"), "Ana drives a Kia", "new", "ADD"),
    (("Tomas speaks Polish", "Tomas works as a baker"),
     "Tomas stopped working as a baker and started working as a pilot", "Tomas works as a baker", "UPDATE"),
)

ANSWER_SYSTEM = """You are an intelligent memory assistant that answers questions from conversation memories.

# CONTEXT
You have memories from the two speakers of a conversation. They carry timestamps and may be relevant to
the question.

# INSTRUCTIONS
1. Read all memories of both speakers carefully, paying attention to the timestamps.
2. For a question about a specific event or fact, look for direct evidence in the memories.
3. If memories contradict each other, prefer the most recent one.
4. Turn relative time references into absolute dates using the memory's timestamp: a memory from
   4 May 2022 that mentions "went to India last year" means the trip was in 2021. Answer with the date,
   month or year, not with the relative reference.
5. Use only the content of the memories; do not confuse people mentioned in a memory with the speakers.
6. The answer should be less than 5-6 words.
{distill_rules}"""

DISTILL_RULES = """7. First select the memories that are useful for the question and list them under
   **Memories selected as relevant:** as bullet lines; ignore the rest.
8. Then give the final answer after **Answer:**

Output format:
**Memories selected as relevant:**
- <memory>
**Answer:** <answer>"""

PLAIN_RULES = """7. Give the final answer after **Answer:**"""


def facts_messages(turn_text: str, date: str = "", speaker: str = "") -> list[dict]:
    who = f" {speaker}:" if speaker else ""
    when = f" ({date})" if date else ""
    return [{"role": "system", "content": FACTS_SYSTEM},
            {"role": "user", "content": f"Turn{when}{who} {turn_text}"}]


MANAGER_FORMATS = ("mem0", "ops")


def manager_messages(memories: list[dict], facts: list[str], fmt: str = "mem0") -> list[dict]:
    """memories: [{"id": "0", "text": ...}] with ids already renamed to "0", "1", ... (Mem0's convention).
    The "ops" format also shows MANAGER_OPS_DEMOS, each as a user turn and the answer the format writes."""
    if fmt not in MANAGER_FORMATS:
        raise ValueError(f"unknown manager format {fmt!r} (choose from {', '.join(MANAGER_FORMATS)})")
    system = MANAGER_OPS_SYSTEM if fmt == "ops" else MANAGER_SYSTEM
    demos = []
    for shown, fact, about, event in MANAGER_OPS_DEMOS if fmt == "ops" else ():
        answer = {"memory": [{"fact": 0, "about": about, "event": event}]}
        demos += [{"role": "user", "content": manager_user([{"id": str(i), "text": t} for i, t in enumerate(shown)],
                                                            [fact], fmt)},
                  {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)}]
    return [{"role": "system", "content": system}, *demos, {"role": "user", "content": manager_user(memories, facts, fmt)}]


def manager_user(memories: list[dict], facts: list[str], fmt: str) -> str:
    """The manager's user turn: the memories shown and the new facts (numbered in the "ops" format, whose
    answer refers to them by number)."""
    shown = json.dumps([{"id": m["id"], "text": m["text"]} for m in memories], ensure_ascii=False)
    if fmt == "ops":
        listed = json.dumps([{"fact": i, "text": f} for i, f in enumerate(facts)], ensure_ascii=False)
    else:
        listed = json.dumps(list(facts), ensure_ascii=False)
    return f"Existing memories:\n{shown}\n\nNew facts:\n{listed}\n\nAnswer with the JSON only."


def format_memories(memories: list[dict]) -> str:
    return "\n".join(f"- {m.get('timestamp') or ''}: {m['text']}" for m in memories)


def answer_messages(question: str, speaker_a: str, memories_a: list[dict], speaker_b: str,
                    memories_b: list[dict], distill: bool = True) -> list[dict]:
    system = ANSWER_SYSTEM.format(distill_rules=DISTILL_RULES if distill else PLAIN_RULES)
    user = (f"Memories for user {speaker_a}:\n\n{format_memories(memories_a)}\n\n"
            f"Memories for user {speaker_b}:\n\n{format_memories(memories_b)}\n\n"
            f"Question: {question}")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------------
# Output formats as automata (grammar.py): with guided decoding, every output that ends parses ok
# --------------------------------------------------------------------------------------------------

WS = star(byte_in(" \n\t\r"))  # JSON whitespace between structural characters
TEXT_BYTE = byte_in(set(range(0x20, 0x100)) - {ord('"'), ord("\\")})  # inside a JSON string, as it is
ESCAPE = seq(lit("\\"), alt(byte_in('"\\/bfnrt'), seq(lit("u"), *[byte_in("0123456789abcdefABCDEF")] * 4)))
STRING = seq(lit('"'), star(alt(TEXT_BYTE, ESCAPE)), lit('"'))
# A string with a visible ASCII first character: it cannot strip to "" (a blank fact or memory is refused).
NONBLANK_STRING = seq(lit('"'), byte_in(set(range(0x21, 0x7F)) - {ord('"'), ord("\\")}),
                      star(alt(TEXT_BYTE, ESCAPE)), lit('"'))


def json_list(item) -> tuple:
    """[item, item, ...] with JSON whitespace anywhere between them; possibly empty."""
    return seq(lit("["), WS, opt(seq(item, star(seq(WS, lit(","), WS, item)), WS)), lit("]"))


def json_key(name: str) -> tuple:
    return seq(WS, lit(f'"{name}"'), WS, lit(":"), WS)


@functools.lru_cache
def facts_automaton() -> Automaton:
    """{"facts": ["fact", ...]}: every fact a non-blank string."""
    return Automaton(seq(lit("{"), json_key("facts"), json_list(NONBLANK_STRING), WS, lit("}"), WS))


@functools.lru_cache
def manager_automaton(n_ids: int) -> Automaton:
    """{"memory": [EVENT, ...]}, EVENT = {"id": ID, "text": TEXT, "event": OP[, "old_memory": STRING]}.

    ID is one of "0" ... str(n_ids - 1): the ids shown in the prompt and then fresh ones for ADD (the
    caller passes shown memories + facts). Keys come in the prompt's order; old_memory is optional (the
    prompt asks for it with UPDATE only); TEXT is non-blank, so an ADD or UPDATE always has a text.
    """
    ids = alt(*[lit(str(i)) for i in range(max(n_ids, 1))])
    op = alt(*[lit(name) for name in ("ADD", "UPDATE", "DELETE", "NONE")])
    event = seq(lit("{"), json_key("id"), lit('"'), ids, lit('"'), WS, lit(","), json_key("text"), NONBLANK_STRING,
                WS, lit(","), json_key("event"), lit('"'), op, lit('"'),
                opt(seq(WS, lit(","), json_key("old_memory"), STRING)), WS, lit("}"))
    return Automaton(seq(lit("{"), json_key("memory"), json_list(event), WS, lit("}"), WS))


@functools.lru_cache(maxsize=1024)  # one per distinct set of shown memories
def manager_ops_automaton(shown: tuple[str, ...], n_facts: int) -> Automaton:
    """{"memory": [ENTRY 0, ..., ENTRY n_facts-1]}, ENTRY i = {"fact": i, "about": ABOUT, "event": ...}: one
    entry per fact, in order, with no optional whitespace, so everything but the choices is forced (one token
    at a time, log-prob 0: Automaton's forced_runs). ABOUT is "new" (then ADD) or the text of one of the
    `shown` memories, copied (then UPDATE, DELETE, NONE, or MERGE and a non-blank "text"): naming a memory by
    its words is a copy a small model does well, where an id is an arbitrary number (measured: docs/manager.md)."""
    on_memory = alt(lit('UPDATE"}'), lit('DELETE"}'), lit('NONE"}'), seq(lit('MERGE", "text": '), NONBLANK_STRING,
                                                                         lit("}")))
    about = alt(lit('new", "event": "ADD"}'),
                *[seq(lit(json.dumps(text, ensure_ascii=False)[1:-1] + '", "event": "'), on_memory)
                  for text in dict.fromkeys(shown)])
    entries = [seq(lit(f'{{"fact": {i}, "about": "'), about) for i in range(n_facts)]
    body = [part for i, e in enumerate(entries) for part in ((lit(", "), e) if i else (e,))]
    return Automaton(seq(lit('{"memory": ['), *body, lit("]}")), forced_runs=True)


def decision_marker(tok) -> int:
    """The token that says "new" at the ops format's "about" slot (decision.py finds the slot by it)."""
    ids = tok.encode("new")
    if len(ids) != 1:
        raise ValueError(f'this tokenizer splits "new" into {len(ids)} tokens; the decision head needs one')
    return ids[0]


def manager_format_automaton(fmt: str, shown: list[dict], n_facts: int) -> Automaton:
    """The manager's output format for a prompt showing the memories `shown` ({"id", "text"}) and `n_facts` facts."""
    if fmt == "ops":
        return manager_ops_automaton(tuple(m["text"] for m in shown), n_facts)
    return manager_automaton(len(shown) + n_facts)


# Distillation keeps "the few memories that matter" (docs/method.md section 1); after this many lines the format allows
# only **Answer:**. Unbounded, a small model copies memory after memory and never answers: SmolLM2 greedy,
# 5 + 5 memories, 64 new tokens (the cpu preset and docs/results.md's evaluation rows): 81 of 81 val answers cut
# off before **Answer:**; at most 2 lines, 16 of the first 16; at most 1, none (each line copies a dated
# memory, ~18 tokens). A larger model and budget can take more.
MAX_SELECTED = 1
# The answer's line: no line break (only the first line is the answer) and no '*' (a second **Answer:**
# would move the parser's answer after it); it starts with a visible ASCII character other than ':' (which
# the marker's pattern would take), so it is never empty.
ANSWER_LINE = seq(star(lit(" ")), byte_in(set(range(0x21, 0x7F)) - {ord("*"), ord(":")}),
                  star(byte_in(set(range(0x20, 0x100)) - {ord("*")})))


@functools.lru_cache
def answer_automaton(distill: bool = True, max_selected: int = MAX_SELECTED) -> Automaton:
    """**Memories selected as relevant:** and up to `max_selected` "- memory" lines (with distillation), then
    **Answer:** and one line, then the end."""
    answer = seq(lit("**Answer:**"), ANSWER_LINE)
    if not distill:
        return Automaton(answer)
    memory_line = seq(lit("- "), star(byte_in(set(range(0x20, 0x100)))), lit("\n"))
    return Automaton(seq(lit("**Memories selected as relevant:**\n"), *[opt(memory_line)] * max_selected, answer))


# --------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    value: object  # what could be recovered (an empty list / string when nothing)
    ok: bool  # True only when the output had the expected shape
    error: str = ""  # why parsing failed, or what had to be repaired
    selected: list = field(default_factory=list)  # parse_answer: the memories listed as relevant


def close_truncated_json(text: str) -> str:
    """Append the quotes and brackets a cut-off JSON text still needs (scanning strings and escapes)."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            if ch == '"' and not escaped:
                in_string = False
            escaped = ch == "\\" and not escaped  # a backslash escapes the next character, unless escaped
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}" and stack:
            stack.pop()
    tail = ('"' if in_string else "")
    body = (text + tail).rstrip()
    body = re.sub(r",\s*$", "", body)  # a dangling comma before the closers
    if stack and stack[-1] == "}":  # inside an object, a trailing lone string is a key cut off before its value
        body = re.sub(r'([{,]\s*"[^"]*")\s*:?\s*$', r"\1: null", body)
    return body + "".join(reversed(stack))


def extract_json_object(text) -> tuple[dict | None, str]:
    """The first JSON object in `text` (code fences and prose allowed around it), repairing truncation."""
    if not isinstance(text, str):
        return None, f"output is {type(text).__name__}, not text"
    unfenced = re.sub(r"```(?:json)?", "", text)
    # The text as written first: removing code fences everywhere would also change strings that hold ```.
    for candidate in (text, unfenced) if unfenced != text else (text,):
        obj, note = first_json_object(candidate)
        if obj is not None:
            return obj, note
    return None, "no JSON object found"


MAX_STARTS = 32  # '{' positions tried: the object is at the start of an answer, and each try reads the rest


def first_json_object(text: str) -> tuple[dict | None, str]:
    decoder = json.JSONDecoder()
    starts = [m.start() for m, _ in zip(re.finditer(r"\{", text), range(MAX_STARTS))]
    for start in starts:  # the outermost object comes first
        try:
            obj, _ = decoder.raw_decode(text[start:])
            note = ""
        except RecursionError:  # nesting deeper than Python's stack (a sampled "[[[[..."): not our shape
            continue
        except json.JSONDecodeError:
            try:  # maybe the output was cut off at the token limit
                obj, note = json.loads(close_truncated_json(text[start:])), "repaired truncated JSON"
            except (json.JSONDecodeError, RecursionError):
                continue
        if isinstance(obj, dict):
            return obj, note
    return None, ""


def extract_list(text, key: str) -> tuple[list | None, str]:
    """The list under `key` of the first JSON object in `text`, with a note (repair or failure reason)."""
    obj, note = extract_json_object(text)
    if obj is None:
        return None, note
    value = obj.get(key)
    if not isinstance(value, list):
        return None, f'"{key}" is {type(value).__name__}, not a list'
    return value, note


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def drop_lone_surrogates(value):
    """A JSON escape such as "\\ud83d" without its pair decodes to half a character, which no UTF-8 text
    holds: the tokenizer refuses it (TypeError) when the string reaches a prompt. Strings lose such halves."""
    return LONE_SURROGATE.sub("", value) if isinstance(value, str) else value


def parse_facts(text) -> Parsed:
    """{"facts": [str, ...]} -> Parsed(list of non-empty fact strings)."""
    facts, note = extract_list(text, "facts")
    if facts is None:
        return Parsed([], False, note)
    facts = [drop_lone_surrogates(f) for f in facts]
    good = [f.strip() for f in facts if isinstance(f, str) and f.strip()]
    if len(good) != len(facts):
        return Parsed(good, False, f"{len(facts) - len(good)} fact(s) were not non-empty strings")
    return Parsed(good, not note, note)


EVENTS = ("ADD", "UPDATE", "DELETE", "NONE", "NOOP")  # NOOP: the paper's name for NONE


def parse_manager(text) -> Parsed:
    """{"memory": [{"id", "text", "event", "old_memory"}]} -> Parsed(list of event dicts).

    Events keep whatever fields they had; MemoryBank.apply skips (and counts) the invalid ones. `ok` is
    False when the JSON is broken or some event has a wrong shape.
    """
    events, note = extract_list(text, "memory")
    if events is None:
        return Parsed([], False, note)
    dicts = [{k: drop_lone_surrogates(v) for k, v in e.items()} for e in events if isinstance(e, dict)]
    bad = sum(1 for e in dicts if str(e.get("event", "")).strip().upper() not in EVENTS) + len(events) - len(dicts)
    if bad:
        return Parsed(dicts, False, f"{bad} event(s) without a known event type")
    return Parsed(dicts, not note, note)


def parse_manager_ops(text, facts: list[str], shown: list[dict] = ()) -> Parsed:
    """The "ops" format -> Parsed(Mem0-style events for MemoryBank.apply), texts filled in by reference.

    {"fact": i, "about": "new", "event": "ADD"} -> ADD fact i's text; about memory m (its text, as the format
    writes it, or its id): UPDATE -> UPDATE m to fact i's text, MERGE -> UPDATE m to the written "text", DELETE
    -> DELETE m, NONE -> NONE m. An entry naming no fact of the list, or an unknown event, is dropped and makes
    `ok` False; so does a missing fact.
    """
    id_of = {m["text"]: m["id"] for m in shown}
    entries, note = extract_list(text, "memory")
    if entries is None:
        return Parsed([], False, note)
    events, bad, seen = [], 0, set()
    for e in entries:
        e = {k: drop_lone_surrogates(v) for k, v in e.items()} if isinstance(e, dict) else {}
        i, op = e.get("fact"), str(e.get("event", "")).strip().upper()
        about = id_of.get(e.get("about"), str(e.get("about", "")))
        if not (isinstance(i, int) and 0 <= i < len(facts)) or op not in ("ADD", "UPDATE", "MERGE", "DELETE", "NONE"):
            bad += 1
            continue
        seen.add(i)
        if op == "ADD":
            events.append({"id": "new", "text": facts[i], "event": "ADD"})
        elif op == "MERGE":
            events.append({"id": about, "text": e.get("text"), "event": "UPDATE"})
        else:
            events.append({"id": about, "text": facts[i], "event": op})
    missing = len(set(range(len(facts))) - seen)
    error = "; ".join(x for x in (note, bad and f"{bad} entry(ies) without a known fact and event",
                                  missing and f"{missing} fact(s) without an entry") if x)
    return Parsed(events, not error, error)


def parse_manager_output(text, facts: list[str], fmt: str = "mem0", shown: list[dict] = ()) -> Parsed:
    """Either format's output as Mem0-style events (MemoryBank.apply takes them)."""
    return parse_manager_ops(text, facts, shown) if fmt == "ops" else parse_manager(text)


ANSWER_MARK = re.compile(r"\*\*\s*answer\s*:?\s*\*\*\s*:?", re.I)
SELECTED_MARK = re.compile(r"\*\*\s*memories selected as relevant\s*:?\s*\*\*\s*:?", re.I)


def parse_answer(text) -> Parsed:
    """The text after the last `**Answer:**` -> Parsed(answer); also `.selected` memories when listed.

    Without the marker the whole output (first line) is kept as a fallback answer and ok is False.
    """
    if not isinstance(text, str):
        return Parsed("", False, f"output is {type(text).__name__}, not text")
    marks = list(ANSWER_MARK.finditer(text))
    sel = SELECTED_MARK.search(text)
    end = marks[-1].start() if marks else len(text)
    selected = [re.sub(r"^\s*[-*•]\s*", "", line).strip() for line in text[sel.end():end].splitlines()
                if line.strip()] if sel else []
    if not marks:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        return Parsed(first, False, "no **Answer:** marker", selected)
    answer = text[marks[-1].end():].strip().splitlines()
    answer = answer[0].strip() if answer else ""
    return Parsed(answer, bool(answer), "" if answer else "empty answer after **Answer:**", selected)
