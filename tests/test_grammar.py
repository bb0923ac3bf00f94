"""Guided decoding (grammar.py and the formats in prompts.py): the automata on hand-written text and token
sequences, random walks that never dead-end, sampled outputs that always parse, and a loss pass whose
log-probs are the sampler's (ratio 1), forced tokens included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import losspass
import model as M
import prompts as P
from grammar import Automaton, allowed_masks, byte_in, guide_for, lit, seq, star
from sampling import generate


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return M.load_model(smollm2_path)


def ids(tok, *pieces):
    """Token ids of vocabulary entries written in the byte-level alphabet (Ġ = space, Ċ = newline)."""
    vocab = tok.tk.get_vocab()
    return [vocab[p] for p in pieces]


def test_automata_accept_their_formats_and_nothing_else():
    facts, manager, answer = P.facts_automaton(), P.manager_automaton(3), P.answer_automaton(True)
    assert facts.matches(b'{"facts": []}') and facts.matches('{ "facts" : [ "M\u00e9lanie", "a\\"b\\\\" ] }\n'.encode())
    assert not facts.matches(b'{"facts": [" "]}')  # a blank fact would be refused by the parser
    assert not facts.matches(b'{"facts": ["x"]')  # unfinished
    assert not facts.matches(b'{"facts": ["a\\q"]}')  # not a JSON escape
    event = '{"id": "%s", "text": "t", "event": "%s"}'
    assert manager.matches(('{"memory": [%s, %s]}' % (event % ("2", "UPDATE"), event % ("0", "NONE"))).encode())
    assert not manager.matches(('{"memory": [%s]}' % (event % ("3", "ADD"))).encode())  # ids "0".."2" only
    assert not manager.matches(('{"memory": [%s]}' % (event % ("0", "MERGE"))).encode())
    assert answer.matches(b"**Memories selected as relevant:**\n- 8 May 2023: a\n**Answer:** Paris")
    for bad in (b"**Memories selected as relevant:**\n**Answer:** ", b"**Answer:** Paris",
                b"**Memories selected as relevant:**\n**Answer:** a *b*", b"**Memories selected as relevant:**\n"
                b"**Answer:** Paris\nmore"):
        assert not answer.matches(bad)
    assert P.answer_automaton(False).matches(b"**Answer:** 7 May 2023")


def test_every_accepted_text_parses_ok():
    texts = ['{"facts": ["Caroline paints", "x\\ud83d"]}', '{"memory": []}',
             '{"memory": [{"id": "1", "text": "a", "event": "DELETE", "old_memory": ""}]}',
             "**Memories selected as relevant:**\n- x\n**Answer:**  Paris, France."]
    for text, automaton, parse in zip(texts, [P.facts_automaton(), P.manager_automaton(2), P.manager_automaton(2),
                                              P.answer_automaton(True)],
                                      [P.parse_facts, P.parse_manager, P.parse_manager, P.parse_answer]):
        assert automaton.matches(text.encode()) and parse(text).ok, text


def test_tokens_across_boundaries_escapes_unicode_and_the_end(smollm2):
    net, tok = smollm2
    g = guide_for(P.facts_automaton(), net, tok, True)
    a = g.automaton
    inside = a.walk(g.start, b'{"facts": ["Melanie')  # inside the first string
    allowed = g.allowed(inside)
    quote_comma, quote, esc_quote, esc_backslash, half_e_acute, e_acute = ids(tok, '",', '"', '\\"', '\\\\', "Ã", "é")
    assert allowed[[quote_comma, quote, esc_quote, esc_backslash, half_e_acute, e_acute]].all()
    after = g.advance(inside, quote_comma)  # `",` closes the string and starts the next item
    assert after >= 0 and a.accepting(a.walk(after, b' "x"]}'))
    assert not g.allowed(after)[ids(tok, "]")[0]]  # a comma needs another item
    stop = tok.stop_ids[0]
    assert not allowed[stop]  # the end is refused outside an accepting state ...
    done = a.walk(g.start, b'{"facts": ["Melanie"]}')
    assert g.allowed(done)[stop] and a.accepting(done)  # ... and allowed in one
    assert g.allowed(g.start)[ids(tok, "{")[0]] and not g.allowed(g.start)[ids(tok, '"')[0]]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["facts", "manager", "answer", "plain"]))
def test_random_walks_over_allowed_tokens_never_dead_end(smollm2, seed, fmt):
    net, tok = smollm2
    automaton = {"facts": P.facts_automaton(), "manager": P.manager_automaton(4),
                 "answer": P.answer_automaton(True), "plain": P.answer_automaton(False)}[fmt]
    g = guide_for(automaton, net, tok, True)
    gen, state = torch.Generator().manual_seed(seed), g.start
    for _ in range(60):
        allowed = g.allowed(state)  # raises if a state allows nothing
        assert state >= 0 and allowed.any()
        choice = torch.nonzero(allowed)[torch.randint(int(allowed.sum()), (1,), generator=gen)].item()
        if choice in tok.stop_ids:
            assert automaton.accepting(state)
            break
        state = g.advance(state, choice)


FORMATS = {  # format -> (messages, automaton, parser, max new tokens)
    "facts": (P.facts_messages("I adopted a dog named Buddy last week!", "8 May 2023", "Melanie"),
              P.facts_automaton(), P.parse_facts, 48),
    "manager": (P.manager_messages([{"id": "0", "text": "Melanie adopted a dog named Buddy"},
                                    {"id": "1", "text": "Melanie lives in Boston"}],
                                   ["Melanie adopted another dog named Scout"]),
                P.manager_automaton(3), P.parse_manager, 64),
    "answer": (P.answer_messages("What pets does Melanie have?", "Caroline", [{"text": "Caroline paints"}], "Melanie",
                                 [{"text": "Melanie adopted a dog named Buddy", "timestamp": "8 May 2023"}]),
               P.answer_automaton(True), P.parse_answer, 40),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("which", ["smollm2", "random"])
def test_sampled_outputs_always_parse(fmt, which, smollm2, tiny_checkpoints):
    """64 completions of SmolLM2 (200 of a tiny random model) at temperature 1: every one that ends (a stop
    id) parses ok; the others were cut at max_new_tokens (counted as truncated by train.py). Unguided, 1 of
    50 of SmolLM2's fact extractions parsed (measured)."""
    net, tok = smollm2 if which == "smollm2" else M.load_model(tiny_checkpoints["qwen2"][0])
    messages, automaton, parse, max_new = FORMATS[fmt]
    n = 64 if which == "smollm2" else 200
    outs = generate(net, [tok.chat(messages)] * n, max_new, temperature=1.0, seed=1,
                    guide=guide_for(automaton, net, tok, True))
    ended = [o for o in outs if o[-1] in tok.stop_ids]
    for o in ended:
        assert parse(tok.decode(o)).ok, tok.decode(o)
    assert all(len(o) == max_new for o in outs if o[-1] not in tok.stop_ids)
    if which == "smollm2":  # measured: 31, 14 and 11 of 64 ended (facts, manager, answer); random: 49, 144, 0 of 200
        assert ended  # the check above is not empty


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_loss_pass_reproduces_the_samplers_log_probs(tiny_checkpoints, top_p):
    """Ratio 1 before any update: the loss pass renormalises over the tokens each position was sampled from
    (the format's, and top-p's nucleus); a token the format forces has log-prob exactly 0 and no gradient."""
    net, tok = M.load_model(tiny_checkpoints["llama"][0])
    g = guide_for(P.answer_automaton(True), net, tok, True)
    prompt = tok.chat([{"role": "user", "content": "Who?"}])
    tokens, logps, supports = generate(net, [prompt] * 6, 48, temperature=0.8, top_p=top_p, seed=3, guide=g,
                                       return_logprobs=True, return_supports=True)
    allowed = allowed_masks(tokens, net.lm_head.weight.shape[0], g, supports if top_p < 1 else None)
    logp, mask = losspass.completion_logprobs(net, prompt, tokens, temperature=0.8, allowed=allowed)
    for i, (c, lp) in enumerate(zip(tokens, logps)):
        assert torch.allclose(logp[i, :len(c)], torch.tensor(lp), atol=1e-5)
    n_forced = len("**Memories selected as relevant:**\n".encode())  # one byte token each in this vocabulary
    assert torch.equal(logp[:, :n_forced], torch.zeros(6, n_forced))
    logp.sum().backward()  # no NaN from the masked-out logits, and nothing flows back from forced tokens
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    unguided, _ = losspass.completion_logprobs(net, prompt, tokens, temperature=0.8)
    assert (unguided[:, :n_forced] < -1e-3).all()  # without the mask the forced tokens were merely likely


def test_allowed_masks_keep_the_nucleus_and_pad_with_everything():
    a = Automaton(seq(lit("ab"), star(byte_in("c"))))
    assert a.matches(b"abccc") and not a.matches(b"abd") and a.walk(a.start, b"x") == -1
    supports = [[None, torch.tensor([1])], [None]]
    out = allowed_masks([[0, 1], [0]], 5, None, supports)
    assert out.shape == (2, 2, 5) and out[0, 0].all() and out[0, 1].tolist() == [False, True, False, False, False]
    assert out[1, 1].all()  # padding
    assert allowed_masks([[0]], 5) is None


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_rollout_groups_carry_the_sampling_support_to_the_loss_pass(tiny_checkpoints, top_p):
    """train.rollout with a format (and top-p): each group's allowed() gives the loss pass the sets the
    tokens were drawn from, so the new policy's log-probs equal the old ones before any update."""
    import agents
    import train

    ckpt = tiny_checkpoints["llama"][0]
    net, tok = M.load_model(ckpt)
    fmt = guide_for(P.answer_automaton(False), net, tok, True)
    example = agents.Example(tok.chat([{"role": "user", "content": "Who?"}]), "x", {}, fmt)
    task = agents.Task([example], [], lambda ex, texts: [{"reward": float(len(t) % 2)} for t in texts])
    args = train.parse_args(["--model", str(ckpt), "--preset", "cpu", "--group-size", "4", "--max-new-tokens", "16",
                             "--beta", "0"], settings=dict(top_p=top_p))
    groups, _ = train.rollout(net, tok, task, task.train, 0, args)
    for g in groups:
        logp, mask = net.logprobs(g.prompt, g.completions, args.temperature, False, g.allowed())
        assert torch.allclose(logp[mask], g.old_logp[mask], atol=1e-5)
