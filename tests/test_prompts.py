"""prompts.py: the prompts' shape, and parsers on a corpus of malformed outputs (never raising)."""

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prompts import (answer_messages, close_truncated_json, facts_messages, manager_messages, parse_answer,
                     parse_facts, parse_manager)


def test_answer_prompt_layout():
    msgs = answer_messages("Where did Caroline go?", "Caroline", [{"text": "went to the beach", "timestamp":
                           "8 May 2023"}], "Melanie", [{"text": "paints", "timestamp": None}])
    user = msgs[1]["content"]
    assert user.startswith("Memories for user Caroline:\n\n- 8 May 2023: went to the beach\n\n"
                           "Memories for user Melanie:\n\n- : paints\n\nQuestion: Where did Caroline go?")
    assert "**Memories selected as relevant:**" in msgs[0]["content"] and "**Answer:**" in msgs[0]["content"]
    plain = answer_messages("q", "A", [], "B", [], distill=False)[0]["content"]
    assert "selected as relevant" not in plain and "**Answer:**" in plain


def test_manager_and_facts_prompts_carry_their_inputs():
    user = manager_messages([{"id": "0", "text": "Melanie adopted a dog named Buddy", "score": 0.9}],
                            ["Melanie adopted Scout"])[1]["content"]
    assert '[{"id": "0", "text": "Melanie adopted a dog named Buddy"}]' in user
    assert '["Melanie adopted Scout"]' in user
    assert facts_messages("I love pottery", "8 May 2023", "Melanie")[1]["content"] == \
        "Turn (8 May 2023) Melanie: I love pottery"


FACTS_CASES = [
    ('{"facts": ["a", "b"]}', ["a", "b"], True),
    ('```json\n{"facts": ["Caroline paints"]}\n```', ["Caroline paints"], True),
    ('Sure! Here are the facts: {"facts": ["x"]} Hope this helps.', ["x"], True),
    ('{"facts": ["one", "two', ["one", "two"], False),  # cut off mid-string
    ('{"facts": ["one",', ["one"], False),
    ('{"facts": "just a string"}', [], False),
    ('{"facts": ["ok", 3, null, ""]}', ["ok"], False),
    ("no json here", [], False),
    ("", [], False),
    ('{"fact": ["typo key"]}', [], False),
    ('[{"facts": ["in a list"]}]', ["in a list"], True),
]


@pytest.mark.parametrize("text,facts,ok", FACTS_CASES)
def test_parse_facts(text, facts, ok):
    got = parse_facts(text)
    assert got.value == facts and got.ok == ok
    assert ok or got.error


MANAGER_OK = {"memory": [{"id": "0", "text": "Melanie adopted two dogs, Buddy and Scout", "event": "UPDATE",
                          "old_memory": "Melanie adopted a dog named Buddy"},
                         {"id": "1", "text": "Melanie went camping", "event": "ADD"}]}


def test_parse_manager_good_and_fenced():
    for text in [json.dumps(MANAGER_OK), "```json\n" + json.dumps(MANAGER_OK, indent=2) + "\n```",
                 "Here you go:\n" + json.dumps(MANAGER_OK) + "\nDone."]:
        got = parse_manager(text)
        assert got.ok and got.value == MANAGER_OK["memory"]


@pytest.mark.parametrize("text,n_events,error", [
    (json.dumps(MANAGER_OK)[:-2], 2, "repaired truncated JSON"),  # only the closing brackets lost
    (json.dumps(MANAGER_OK)[:-25], 2, "known event type"),  # cut inside the 2nd event: it lost its type
    ('{"memory": {"id": "0"}}', 0, "not a list"),
    ('{"memory": [{"id": "0", "text": "x", "event": "MERGE"}]}', 1, "known event type"),
    ('{"memory": ["ADD everything"]}', 0, "known event type"),
    ("I think we should add the fact.", 0, "no JSON object"),
    (None, 0, "not text"),
])
def test_parse_manager_malformed(text, n_events, error):
    got = parse_manager(text)
    assert not got.ok or "repaired" in got.error
    assert len(got.value) == n_events and error in got.error


def test_parse_answer():
    out = "**Memories selected as relevant:**\n- 8 May 2023: went to the beach\n- likes sun\n**Answer:** beach"
    got = parse_answer(out)
    assert got.ok and got.value == "beach"
    assert got.selected == ["8 May 2023: went to the beach", "likes sun"]
    assert parse_answer("blah\n**Answer**: 7 May 2023\nextra").value == "7 May 2023"
    assert parse_answer("**answer:** Paris").value == "Paris"
    missing = parse_answer("I think it was the beach.\nMore text")
    assert not missing.ok and missing.value == "I think it was the beach." and "no **Answer:**" in missing.error
    empty = parse_answer("**Answer:**   ")
    assert not empty.ok and empty.value == ""
    assert not parse_answer(None).ok and not parse_answer("").ok


def test_close_truncated_json():
    assert json.loads(close_truncated_json('{"a": [1, 2, {"b": "x\\"y')) == {"a": [1, 2, {"b": 'x"y'}]}
    assert json.loads(close_truncated_json('{"a": 1, "b"')) == {"a": 1, "b": None}


junk = st.text(max_size=200) | st.lists(st.sampled_from(
    ['{', '}', '[', ']', '"', ':', ',', '"facts"', '"memory"', '"event"', '"ADD"', "```json", "**Answer:**",
     "**Memories selected as relevant:**", "\n", "- x", "null", "3", "\\", "text"]), max_size=40).map("".join)


@settings(max_examples=500, deadline=None)
@given(junk)
def test_parsers_never_raise(text):
    for parse in (parse_facts, parse_manager, parse_answer):
        got = parse(text)
        assert isinstance(got.ok, bool) and isinstance(got.error, str)
        assert got.ok or got.error or got.value in ([], "")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
                max_size=5), st.integers(min_value=0, max_value=200))
@example(facts=["```"], cut=200)  # a fence inside a string is data, not markdown (it was stripped once)
@example(facts=["```x"], cut=16)
@example(facts=["ab\U00010000"], cut=20)  # cut between the halves of the escape "\\ud800\\udc00"
def test_truncated_facts_recover_a_prefix(facts, cut):
    """Output cut off at any character gives back the facts before the cut, in order, and at most the
    beginning of the fact the cut fell in; a cut output is never ok."""
    text = json.dumps({"facts": facts})
    got = parse_facts(text[:cut])
    clean = [f.strip() for f in facts if f.strip()]
    if cut >= len(text):
        assert got.value == clean and got.ok == (len(clean) == len(facts))  # a blank fact is reported
        return
    assert not got.ok
    n = len(got.value)
    assert n <= len(clean)
    if n:
        assert got.value[:-1] == clean[:n - 1]
        assert clean[n - 1].startswith(got.value[-1])  # the last one whole, or cut short


def test_half_characters_from_json_escapes_are_dropped():
    """A model can write "\\ud83d" without its pair; json decodes it to a lone surrogate, which the tokenizer
    refuses once the memory reaches a prompt. Parsed strings keep whole characters only."""
    facts = parse_facts('{"facts": ["Melanie likes \\ud83d cats", "a smile \\ud83d\\ude00", "\\udc00"]}')
    assert facts.value == ["Melanie likes  cats", "a smile \U0001f600"]
    events = parse_manager('{"memory": [{"id": "0", "text": "Buddy\\udc00", "event": "ADD", "old_memory": "\\ud800"}]}')
    assert events.value == [{"id": "0", "text": "Buddy", "event": "ADD", "old_memory": ""}]
    for value in facts.value + [events.value[0]["text"]]:
        value.encode("utf-8")  # raises on a lone surrogate


def malformed_outputs(n: int, seed: int = 0) -> list[str]:
    """n outputs a sampling model could write: valid ones cut anywhere, deep nesting, wrong types, huge
    strings, control and non-BMP characters, lone surrogate escapes, and their mixtures."""
    import random
    rng = random.Random(seed)
    good = [json.dumps({"memory": [{"id": "0", "text": "Melanie adopted two dogs, Buddy and Scout", "event": "UPDATE",
                                    "old_memory": "Melanie adopted a dog"}, {"id": "1", "text": "x", "event": "ADD"}]}),
            json.dumps({"facts": ["Caroline went to a support group", "Caroline paints"]}),
            "**Memories selected as relevant:**\n- 8 May 2023: a\n**Answer:** Paris"]
    pieces = ['{', '}', '[', ']', '"', '\\', ':', ',', 'null', 'true', '1e999', '-0', '"\\ud83d"', '"\\u0000"',
              '{"memory": ', '{"facts": ', '{"event": "DELETE", "id": "0"}', '{"event": 7}', '"memory"',
              '**Answer:**', '\n', '\x00', '\x1b', '\u2028', '\U0001f600', 'é', '```json', '```']
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # a valid output cut at any character
            text = rng.choice(good)
            out.append(text[:rng.randrange(len(text) + 1)])
        elif kind == 1:  # deep nesting
            depth = rng.choice([10, 500, 3000])
            out.append(rng.choice(['{"memory": ', '{"facts": ', '']) + rng.choice(["[", "{\"a\": "]) * depth)
        elif kind == 2:  # wrong types where lists and strings should be
            value = rng.choice([5, "x", None, [1, "a", None, [], {}], {"event": ["ADD"]}, [{"id": {}, "text": 3}]])
            out.append(json.dumps({rng.choice(["memory", "facts"]): value}))
        elif kind == 3:  # huge strings
            out.append('{"facts": ["' + "a" * rng.choice([10_000, 200_000]) + rng.choice(['"]}', '']))
        else:  # random mixtures of the pieces above
            out.append("".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40))))
    return out


def test_ten_thousand_malformed_outputs_never_raise_and_keep_the_bank_consistent():
    import numpy as np

    from memory import MemoryBank
    bank = MemoryBank()
    for t in ("Melanie adopted a dog", "Melanie lives in Boston", "Caroline paints"):
        bank.add(t)
    outputs = malformed_outputs(10_000)
    for text in outputs:
        for parse in (parse_facts, parse_manager, parse_answer):
            got = parse(text)
            assert isinstance(got.ok, bool) and isinstance(got.error, str)
            for value in got.value if isinstance(got.value, list) else [got.value]:
                for s in (value.values() if isinstance(value, dict) else [value]):
                    if isinstance(s, str):
                        s.encode("utf-8")  # whole characters only: a prompt can hold it
        counts = bank.apply(parse_manager(text).value, {"0": "0", "1": "1"}, speaker="Melanie")
        assert set(counts) == {"ADD", "UPDATE", "DELETE", "NONE", "invalid"}
    # the bank is consistent: every memory has one live row, holding its own text's embedding
    n = len(bank.memories)
    assert len(bank._id_at) == n == len(bank._row_of) and sorted(bank._row_of.values()) == list(range(n))
    for mid, m in bank.memories.items():
        assert bank._id_at[bank._row_of[mid]] == mid
        assert np.allclose(bank._vecs[bank._row_of[mid]], bank.embedder([m.text])[0], atol=1e-6)
    assert len(bank.log) > 3  # some of the outputs did edit the bank
