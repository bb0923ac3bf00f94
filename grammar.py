"""Guided decoding: an output format as an automaton over bytes, and the tokens that each of its states allows.

    pattern = seq(lit('{"facts": ['), opt(...), lit("]}"))   # a regular pattern, built from the pieces below
    automaton = Automaton(pattern)                            # its DFA over bytes, built lazily
    guide = automaton.guide(tok, vocab_size)                  # bound to a tokenizer's vocabulary
    mask = guide.allowed(state)                               # bool [vocab]: tokens that may come next
    state = guide.advance(state, token)                       # where the token leads

Why bytes: the byte-level BPE vocabularies of Llama-3, Qwen and SmolLM2 have tokens that are a part of one
UTF-8 character, and tokens that cross the automaton's boundaries (`",` ends a string and starts the next
key). A token is allowed in a state when every one of its bytes can be consumed from it, one after the
other, so the model's own tokenisation stays possible (forbidding boundary-crossing tokens distorts its
distribution: DOMINO, arXiv 2403.06988). End of sequence (the tokenizer's stop ids) is allowed only in an
accepting state. The patterns are regular and every state of their automaton can still reach acceptance,
so decoding never dead-ends: every reachable state allows at least one token (there is a one-byte token
for every byte).

Cost: a state's mask is computed once, by walking the tokens whose first byte the state accepts, and
cached with the guide; a decoding step then costs a dictionary lookup and a masked_fill.
Read next: tokenizer.py.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------------------------------
# Patterns: regular expressions over bytes, as nested tuples
# --------------------------------------------------------------------------------------------------


def lit(text: str | bytes):
    """The exact text (UTF-8)."""
    data = text.encode() if isinstance(text, str) else text
    return ("seq", tuple(("byte", frozenset([b])) for b in data))


def byte_in(allowed) -> tuple:
    """One byte from `allowed` (an iterable of ints, or a bytes/str of ASCII characters)."""
    return ("byte", frozenset(allowed.encode() if isinstance(allowed, str) else allowed))


def seq(*parts):
    return ("seq", parts)


def alt(*parts):
    return ("alt", parts)


def star(part):
    return ("star", part)


def opt(part):
    return alt(part, seq())


# --------------------------------------------------------------------------------------------------
# The automaton: Thompson's NFA, determinised lazily (subset construction, one state at a time)
# --------------------------------------------------------------------------------------------------


class Automaton:
    """forced_runs: where the pattern leaves no choice for the next bytes (a literal between two choices), the
    guide allows one token only, the longest that spells a prefix of them (a fixed tokenisation of the forced
    text): such a token has log-prob 0 and no gradient, and the policy's choices are the other positions."""

    def __init__(self, pattern, forced_runs: bool = False):
        self.forced_runs = forced_runs
        self.edges: list[list] = []  # NFA state -> [(frozenset of bytes, target)]
        self.eps: list[list] = []  # NFA state -> [target] (empty moves)
        start, self.final = self._build(pattern)
        self.sets: list[frozenset] = []  # DFA state -> its set of NFA states
        self.ids: dict[frozenset, int] = {}
        self.trans: list[dict] = []  # DFA state -> {byte: DFA state}; -1 = dead
        self.start = self._dfa_state(self._closure({start}))
        self._guides = {}

    def _new(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def _build(self, p) -> tuple[int, int]:
        """NFA fragment (entry, exit) of pattern p."""
        kind, arg = p
        a, b = self._new(), self._new()
        if kind == "byte":
            self.edges[a].append((arg, b))
        elif kind == "seq":
            cur = a
            for part in arg:
                s, e = self._build(part)
                self.eps[cur].append(s)
                cur = e
            self.eps[cur].append(b)
        elif kind == "alt":
            for part in arg:
                s, e = self._build(part)
                self.eps[a].append(s)
                self.eps[e].append(b)
        elif kind == "star":
            s, e = self._build(arg)
            self.eps[a] += [s, b]
            self.eps[e] += [s, b]
        else:
            raise ValueError(f"unknown pattern node {kind!r}")
        return a, b

    def _closure(self, states) -> frozenset:
        todo, seen = list(states), set(states)
        while todo:
            for t in self.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def _dfa_state(self, nfa_set: frozenset) -> int:
        if not nfa_set:
            return -1
        if nfa_set not in self.ids:
            self.ids[nfa_set] = len(self.sets)
            self.sets.append(nfa_set)
            self.trans.append({})
        return self.ids[nfa_set]

    def step(self, state: int, byte: int) -> int:
        """The DFA state after `byte` (-1: the pattern cannot continue with it)."""
        if state < 0:
            return -1
        nxt = self.trans[state].get(byte)
        if nxt is None:
            moved = {t for s in self.sets[state] for allowed, t in self.edges[s] if byte in allowed}
            nxt = self.trans[state][byte] = self._dfa_state(self._closure(moved))
        return nxt

    def walk(self, state: int, data: bytes) -> int:
        for byte in data:
            state = self.step(state, byte)
            if state < 0:
                return -1
        return state

    def next_bytes(self, state: int) -> frozenset:
        """The bytes that can follow in `state`."""
        return frozenset().union(*(allowed for s in self.sets[state] for allowed, _ in self.edges[s]))

    def forced(self, state: int, limit: int = 256) -> bytes:
        """The bytes that must come next from `state` (empty where there is a choice, or the text may end)."""
        run = bytearray()
        while len(run) < limit and not self.accepting(state):
            nxt = self.next_bytes(state)
            if len(nxt) != 1:
                break
            (byte,) = nxt
            run.append(byte)
            state = self.step(state, byte)
        return bytes(run)

    def accepting(self, state: int) -> bool:
        return state >= 0 and self.final in self.sets[state]

    def matches(self, data: bytes) -> bool:
        return self.accepting(self.walk(self.start, data))

    def guide(self, tok, vocab_size: int) -> "Guide":
        """This automaton bound to a tokenizer's vocabulary (cached: masks are shared by every caller)."""
        key = (id(tok), vocab_size)
        if key not in self._guides:
            self._guides[key] = Guide(self, vocabulary(tok, vocab_size), tuple(tok.stop_ids))
        return self._guides[key]


# --------------------------------------------------------------------------------------------------
# A tokenizer's vocabulary as bytes
# --------------------------------------------------------------------------------------------------


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte in a token."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class Vocabulary:
    """Each token id's bytes (None: a special token, never text), indexed by first byte."""

    def __init__(self, tok, vocab_size: int):
        tk = tok.tk
        special = set(tk.get_added_tokens_decoder())
        alphabet = byte_level_alphabet()
        self.size = vocab_size
        self.data: list[bytes | None] = [None] * vocab_size
        for i in range(min(vocab_size, tk.get_vocab_size())):
            piece = tk.id_to_token(i)
            if piece is None or i in special:
                continue
            if all(ch in alphabet for ch in piece):  # byte-level BPE: one character per byte
                self.data[i] = bytes(alphabet[ch] for ch in piece)
            else:  # another kind of vocabulary: the token's text
                self.data[i] = tk.decode([i]).encode()
        self.by_first: dict[int, list[int]] = {}
        for i, data in enumerate(self.data):
            if data:
                self.by_first.setdefault(data[0], []).append(i)


def vocabulary(tok, vocab_size: int) -> Vocabulary:
    cache = tok.__dict__.setdefault("_vocabularies", {})
    if vocab_size not in cache:
        cache[vocab_size] = Vocabulary(tok, vocab_size)
    return cache[vocab_size]


# --------------------------------------------------------------------------------------------------
# The guide: allowed tokens per state
# --------------------------------------------------------------------------------------------------


class Guide:
    def __init__(self, automaton: Automaton, vocab: Vocabulary, stop_ids: tuple):
        self.automaton, self.vocab, self.stop_ids = automaton, vocab, stop_ids
        self.start = automaton.start
        self._masks: dict[int, torch.Tensor] = {}

    def allowed(self, state: int) -> torch.Tensor:
        """Bool [vocab]: the tokens whose bytes the state can consume, and the stop ids when it accepts."""
        mask = self._masks.get(state)
        if mask is None:
            mask = self._masks[state] = self._compute(state)
        return mask

    def _compute(self, state: int) -> torch.Tensor:
        a, vocab, trans = self.automaton, self.vocab, self.automaton.trans
        run = a.forced(state) if a.forced_runs else b""
        if run:  # no choice here: the longest token that spells a prefix of the forced bytes, alone
            fits = [i for i in vocab.by_first.get(run[0], []) if run.startswith(vocab.data[i])]
            mask = torch.zeros(vocab.size, dtype=torch.bool)
            mask[max(fits, key=lambda i: len(vocab.data[i]))] = True
            return mask
        ok = []
        for first, ids in vocab.by_first.items():
            after_first = a.step(state, first)
            if after_first < 0:
                continue
            for i in ids:  # walk the rest of the token's bytes (the inner loop of the whole module)
                s = after_first
                for byte in vocab.data[i][1:]:
                    t = trans[s].get(byte)
                    s = a.step(s, byte) if t is None else t
                    if s < 0:
                        break
                else:
                    ok.append(i)
        mask = torch.zeros(vocab.size, dtype=torch.bool)
        mask[ok] = True
        if a.accepting(state):
            mask[list(self.stop_ids)] = True
        if not mask.any():
            raise RuntimeError(f"state {state} allows no token: the pattern has a dead end")
        return mask

    def advance(self, state: int, token: int) -> int:
        """The state after `token` (a stop id ends the text: the state is kept)."""
        if token in self.stop_ids:
            return state
        data = self.vocab.data[token] if token < self.vocab.size else None
        return -1 if data is None else self.automaton.walk(state, data)

    def states(self, tokens: list[int]) -> list[int]:
        """The state before each token of a completion (what its mask is computed from)."""
        out, s = [], self.start
        for t in tokens:
            out.append(s)
            s = self.advance(s, t)
        return out

    def masks(self, tokens: list[int]) -> torch.Tensor:
        """Bool [len(tokens), vocab]: the allowed set at each position of a completion."""
        return torch.stack([self.allowed(s) for s in self.states(tokens)])


def guide_for(automaton: Automaton, model, tok, guided: bool = True) -> Guide | None:
    """The format's guide over this model's vocabulary, or None when decoding is free (guided=False)."""
    return automaton.guide(tok, model.lm_head.weight.shape[0]) if guided else None


def allowed_masks(completions: list[list[int]], vocab_size: int, guide: Guide | None = None,
                  supports: list[list] | None = None) -> torch.Tensor | None:
    """[G, T, V] bool for the loss pass (losspass.completion_logprobs): at each position of each completion,
    the tokens it was sampled from. The guide's set is re-derived from the completion's own prefix (a
    function of it); top-p's nucleus cannot be, so generate(return_supports=True) recorded it. Padding
    positions allow everything (their log-probs are masked out later). None when there is neither."""
    if guide is None and (supports is None or all(s is None for row in supports for s in row)):
        return None
    out = torch.ones(len(completions), max(map(len, completions)), vocab_size, dtype=torch.bool)
    for i, c in enumerate(completions):
        if guide is not None:
            out[i, :len(c)] = guide.masks(c)
        for t, ids in enumerate(supports[i] if supports is not None else []):
            if ids is not None:
                kept = torch.zeros(vocab_size, dtype=torch.bool)
                kept[ids] = True
                out[i, t] &= kept
    return out
