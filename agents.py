"""The two agents of Memory-R1 as environments: their prompts, their rewards, and running them (paper Alg. 1 and 2; docs/method.md section 1).

    facts = conversation_facts(conv, "observation")             # what the agents remember, turn by turn
    banks = conversation_banks(conv, "add-all", None, ...)      # or "oracle", or a manager run (manager.py)
    task = answer_task(args, tok, model)                         # train.py --agent answer (paper Alg. 2)
    task = manager_task(args, tok, model)                        # train.py --agent manager (paper Alg. 1)

A Task is what train.py's loop needs: training and validation prompts (Example) and a score for a list of
completions (one dict per completion, "reward" first). evaluate.py runs the same pieces without training.

1. Facts. From a data.locomo.Conversation: the dataset's observations, each turn's raw text, or the
   fact-extraction prompt run by a model.
2. The Answer Agent. Per question, the top k memories of each speaker's bank go into the answer prompt
   (with memory distillation, docs/method.md section 1.2); reward = exact match (flag: F1) of the text after **Answer:**.
   The banks come from add-all, the gym's oracle, or a manager model run over the facts (manager.py).
3. The Memory Manager as an RL environment (choices the paper leaves open, each a train.py flag):
   - examples: every turn of the conversation that is evidence for at least one question, with those
     questions; turns for which the fact source has no fact are skipped (nothing to manage);
   - state: banks built from the facts of the preceding `window` turns (default 24; 0 = the whole history),
     every fact ADDed (snapshot builder "add-all": offline, deterministic, no second model);
   - the manager edits the bank of the turn's speaker; the other speaker's bank stays as it is;
   - reward: a frozen Answer Agent answers each linked question greedily from the edited banks (k + k
     retrieval), reward = mean EM (flag: F1). Output from which no event list can be recovered scores 0
     and counts as a parse failure; recovered but malformed output is applied as far as it is valid.
   On the gym (data/gym.py) the right operations are known, so the environment uses them: every fact turn
   is an example, its state the oracle banks of the preceding turns, its questions the turn's probe (the
   attribute's current value: "Where does Alice live now?" right after she moved) and one per memory the
   manager is shown, and each output's decision is scored against the
   oracle's (op_acc, and per kind: a measure no LoCoMo run can give). The cpu preset's reward is the
   answerer's probability of the gold answers (--reward prob), its output format "ops" (prompts.py);
   what each choice does to the ranking of operations is in docs/manager.md.
Read next: grpo.py and ppo.py (the losses), then memory.py.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import data.gym as gym
import data.locomo as locomo  # module attribute access: tests cut the conversations by patching it
import data.longmemeval as longmemeval
from data.locomo import Question
from decision import load_head
from grammar import guide_for
from manager import (OPS, apply_oracle, apply_output, decision, facts_by_turn, oracle_banks, oracle_decision,
                     oracle_kind as manager_oracle_kind,
                     related_memories, run_manager, run_managers)
from memory import FACT_SOURCES, FactRecord, add_all_banks, make_embedder, speaker_memories
from metrics import exact_match, f1
from model import load_model
from prompts import (answer_automaton, answer_messages, facts_automaton, facts_messages, manager_format_automaton,
                     manager_messages, parse_answer, parse_facts)
from sampling import continuation_logprobs, generate

# The datasets, each a module with load_conversations(path), load_split(name, path) and CATEGORY_LABELS
# (train.py and evaluate.py --data): LoCoMo, the memory gym whose right memory operations are known
# (data/gym.py), and LongMemEval's oracle file (a test split only: evaluate.py).
DATASETS = {"locomo": locomo, "gym": gym, "longmemeval": longmemeval}

# --------------------------------------------------------------------------------------------------
# 1. Facts
# --------------------------------------------------------------------------------------------------


def conversation_facts(conv, source: str, model=None, tokenizer=None, batch_size: int = 8,
                       max_new_tokens: int = 128, stats: dict | None = None, guided: bool = False) -> list[FactRecord]:
    """The facts of a data.locomo.Conversation, in conversation order, from one of FACT_SOURCES.

    `llm` runs the fact-extraction prompt greedily over every turn (batched; `guided`: in its JSON format by
    construction); a reply that does not parse contributes whatever facts could be recovered and is
    counted in stats["parse_failures"].
    """
    if source not in FACT_SOURCES:
        raise ValueError(f"unknown fact source {source!r} (choose from {', '.join(FACT_SOURCES)})")
    dates = {s.index: s.date_text for s in conv.sessions}
    if source == "observation":
        return [FactRecord(f.speaker, f.text, f.dia_ids, dates.get(f.session, "")) for f in conv.observations]
    turns = conv.turns()
    if source == "turn":
        return [FactRecord(t.speaker, t.text, [t.dia_id], dates.get(t.session, "")) for t in turns]
    if model is None or tokenizer is None:
        raise ValueError("the llm fact source needs a model and its tokenizer")
    stats = stats if stats is not None else {}
    stats.setdefault("parse_failures", 0)
    out = []
    for i in range(0, len(turns), batch_size):
        chunk = turns[i:i + batch_size]
        prompts = [tokenizer.chat(facts_messages(t.text, dates.get(t.session, ""), t.speaker)) for t in chunk]
        replies = generate(model, prompts, max_new_tokens, temperature=0,
                           guide=guide_for(facts_automaton(), model, tokenizer, guided))
        for turn, reply in zip(chunk, replies):
            parsed = parse_facts(tokenizer.decode(reply))
            stats["parse_failures"] += not parsed.ok
            out += [FactRecord(turn.speaker, f, [turn.dia_id], dates.get(turn.session, "")) for f in parsed.value]
    return out


# --------------------------------------------------------------------------------------------------
# 2. The Answer Agent: a task is prompts plus a score
# --------------------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: list[int]  # chat-formatted prompt token ids
    gold: str
    meta: dict = field(default_factory=dict)
    guide: object = None  # the output format completions follow (grammar.Guide); None: free decoding


@dataclass
class Task:
    train: list[Example]
    val: list[Example]
    # score(example, texts) -> one dict per text: "reward" plus any numbers worth averaging in the log
    score: Callable[[Example, list[str]], list[dict]]
    # score_many([(example, texts), ...]) -> score's lists, all at once (the manager batches its answerer)
    score_many: Callable[[list[tuple]], list[list[dict]]] | None = None

    def score_all(self, pairs: list[tuple]) -> list[list[dict]]:
        return self.score_many(pairs) if self.score_many else [self.score(ex, texts) for ex, texts in pairs]


def score_answer(text: str, gold: str, reward: str = "em", require_marker: bool = True) -> dict:
    """Outcome reward of one Answer Agent output (docs/method.md section 1.4): EM (or F1) of the text after **Answer:**."""
    parsed = parse_answer(text)
    scorable = parsed.ok or (not require_marker and bool(parsed.value))
    em = exact_match(parsed.value, gold) if scorable else 0.0
    f = f1(parsed.value, gold) if scorable else 0.0
    return {"reward": em if reward == "em" else f, "em": em, "f1": f, "parse_fail": float(not parsed.ok)}


def answer_task(args, tok, base_model) -> Task:
    """Answer Agent data (paper Alg. 2): per question, k + k memories from the banks of its conversation, built
    by add-all, by a manager checkpoint, or (the gym) by the oracle's operations (args.manager)."""
    dataset = DATASETS[args.data]
    convs = {c.sample_id: c for c in dataset.load_conversations()}
    embedder = make_embedder(args.embedder, base_model, tok)
    banks = {}
    manager = None if args.manager in ("add-all", "oracle") else load_model(
        args.manager, base_model.lm_head.weight.dtype, base_model.lm_head.weight.device)[0]
    if manager is not None:
        load_head(manager, args.manager)  # a manager trained with --decision-head decides with its head
    answer_guide = guide_for(answer_automaton(args.distill), base_model, tok, args.guided)
    k = trained_setting(args.manager, "manager_k", args.manager_k)  # a checkpoint: as many as it learned to choose from
    if manager is not None:  # its calls batched over every conversation at once (manager.run_managers)
        needed = [convs[i] for i in dict.fromkeys(q.conv_id for s in ("train", "val") for q in dataset.load_split(s))]
        facts = [conversation_facts(c, args.facts, base_model, tok, guided=args.guided) for c in needed]
        built = run_managers(needed, facts, manager, tok, embedder, k, args.manager_max_new_tokens,
                             guided=args.guided, fmt=manager_format_of(args.manager, args.manager_format))
        banks.update({c.sample_id: b for c, b in zip(needed, built)})

    def examples(split: str) -> list[Example]:
        out = []
        for q in dataset.load_split(split):
            conv = convs[q.conv_id]
            if conv.sample_id not in banks:
                banks[conv.sample_id] = conversation_banks(conv, args.manager, manager, args.facts, base_model, tok,
                                                           embedder, k, args.manager_max_new_tokens,
                                                           guided=args.guided,
                                                           fmt=manager_format_of(args.manager, args.manager_format))
            mems_a, mems_b = speaker_memories(conv, banks[conv.sample_id], q.question, args.memories_per_speaker)
            messages = answer_messages(q.question, conv.speaker_a, mems_a, conv.speaker_b, mems_b,
                                       distill=args.distill)
            out.append(Example(tok.chat(messages), q.answer, {"question": q.question, "category": q.category},
                               answer_guide))
        return out

    def score(example: Example, texts: list[str]) -> list[dict]:
        return [score_answer(t, example.gold, args.reward, args.require_marker) for t in texts]

    return Task(examples("train"), examples("val"), score)


def trained_setting(manager: str, key: str, default):
    """A flag a manager checkpoint was trained with (its trainer_state.json records train.py's flags), else
    `default`: a manager runs in the format it learned, shown as many memories as it learned to choose from."""
    state = Path(manager) / "trainer_state.json"
    try:
        value = json.loads(state.read_text())["args"].get(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return default
    return default if value is None else value


def manager_format_of(manager: str, default: str = "mem0") -> str:
    return trained_setting(manager, "manager_format", None) or default


def conversation_banks(conv, builder: str, manager, fact_source: str, model, tok, embedder, k: int = 5,
                       max_new_tokens: int = 256, stats: dict | None = None, guided: bool = False,
                       fmt: str = "mem0") -> dict:
    """One bank per speaker: every fact ADDed ("add-all"), the oracle's operations applied ("oracle", the gym
    only), or the facts run through `manager` (a model) turn by turn."""
    if builder == "oracle":
        if not conv.oracle:
            raise ValueError(f"{conv.sample_id}: oracle banks need known operations (the gym, --data gym)")
        return oracle_banks(conv, embedder)
    facts = conversation_facts(conv, fact_source, model, tok, stats=stats, guided=guided)
    if manager is None:
        return add_all_banks(conv, facts, embedder)
    return run_manager(conv, facts, manager, tok, embedder, k, max_new_tokens, stats, guided=guided, fmt=fmt)


# --------------------------------------------------------------------------------------------------
# 3. The Memory Manager's RL environment (paper Alg. 1)
# --------------------------------------------------------------------------------------------------


def manager_examples(conv, questions, facts: list[FactRecord], tok, embedder, window: int = 24, k: int = 5,
                     vocab_size: int | None = None, fmt: str = "mem0", ask: str = "probe"):
    """The RL states of one conversation (see section 3 above): Example objects; with a vocab_size (of the
    policy's output layer) each carries its format's guide (`fmt`), its ids limited to the shown memories.

    ask (the gym): "probe" asks the turn's probe only; "shown" also asks, for each memory shown to the
    manager, the question about what that memory records, answered as the world stands after the turn (its
    latest probe, unless this turn is about the same attribute: then the probe is that question). So an
    UPDATE or DELETE of the wrong memory loses an answer, and the reward sees every memory it could change.
    """
    by_turn, turns = facts_by_turn(facts), conv.turns()
    linked = defaultdict(list)
    for q in questions:
        for dia_id in q.evidence:
            linked[dia_id].append(q)
    for dia_id, known in conv.oracle.items():  # the gym: each fact turn's probe instead
        if known["probe"]:
            linked[dia_id] = [probe_question(conv, dia_id)]
    out = []
    live = add_all_banks(conv, [], embedder) if conv.oracle else None  # the gym: oracle banks, turn by turn
    about = {speaker: {} for speaker in (conv.speaker_a, conv.speaker_b)}  # the gym: bank id -> latest probe
    for i, turn in enumerate(turns):
        if live is not None and i:
            apply_oracle(live, conv, turns[i - 1])
            note_probes(about, conv, turns[i - 1])
        mine = [f for f in by_turn.get(turn.dia_id, []) if f.speaker == turn.speaker]
        if not linked.get(turn.dia_id) or not mine:
            continue
        if live is not None:
            banks = {speaker: bank.copy() for speaker, bank in live.items()}
        else:
            earlier = turns[max(0, i - window) if window else 0:i]
            banks = add_all_banks(conv, [f for t in earlier for f in by_turn.get(t.dia_id, [])], embedder)
        shown, id_map = related_memories(banks[turn.speaker], [f.text for f in mine], k)
        asked = list(linked[turn.dia_id])
        if live is not None and ask == "shown":
            this_turn = {e["id"] for e in conv.oracle[turn.dia_id]["events"]}
            for mid in id_map.values():
                q = about[turn.speaker].get(mid)
                if q is not None and mid not in this_turn and q.question not in {a.question for a in asked}:
                    asked.append(q)
        prompt = tok.chat(manager_messages(shown, [f.text for f in mine], fmt))
        meta = {"conv": conv, "banks": banks, "speaker": turn.speaker, "id_map": id_map, "facts": mine,
                "questions": asked, "dia_id": turn.dia_id}
        shape = None if vocab_size is None else manager_format_automaton(fmt, shown, len(mine)).guide(tok, vocab_size)
        out.append(Example(prompt, "", meta, shape))
    return out


def probe_question(conv, dia_id: str) -> Question:
    return Question(**conv.oracle[dia_id]["probe"], evidence=[dia_id], conv_id=conv.sample_id, index=-1)


def note_probes(about: dict, conv, turn) -> None:
    """After a gym turn: each memory it added or updated is asked about by its probe; a deleted one by none."""
    known = conv.oracle.get(turn.dia_id)
    if not known:
        return
    for e in known["events"]:
        if e["event"] in ("ADD", "UPDATE") and known["probe"]:
            about[turn.speaker][e["id"]] = probe_question(conv, turn.dia_id)
        elif e["event"] == "DELETE":
            about[turn.speaker].pop(e["id"], None)


ORACLE_KINDS = ("ADD", "UPDATE change", "UPDATE merge", "DELETE", "NONE")


def oracle_kind(example) -> str:
    """A gym state's right decision, one of ORACLE_KINDS (manager.oracle_kind). Operation labels may choose
    training states (balance_kinds, the decision head's recipe), never the reward."""
    meta = example.meta
    return manager_oracle_kind(meta["conv"], meta["dia_id"], meta["facts"])


def balanced_states(examples: list, seed: int = 0) -> list:
    """balance_kinds (flags.DECISION_HEAD): the ADD states and the UPDATE-change states whose memory to change is shown, as many of
    each (the larger kind subsampled, seeded). These are the kinds on which bench/manager_rewards.py measured
    the reward to rank the right decision first; balanced, a step's push on the shared "new" decision cancels
    unless the state tells the two apart (docs/manager.md)."""
    def changeable(ex):
        events = ex.meta["conv"].oracle[ex.meta["dia_id"]]["events"]
        return any(e["event"] == "UPDATE" and e["id"] in ex.meta["id_map"].values() for e in events)

    add = [ex for ex in examples if oracle_kind(ex) == "ADD"]
    change = [ex for ex in examples if oracle_kind(ex) == "UPDATE change" and changeable(ex)]
    n, rng = min(len(add), len(change)), random.Random(f"{seed}-balance")
    return rng.sample(add, n) + rng.sample(change, n)


MAIN_ANSWERER = Path("runs/grpo-answer/checkpoint")  # where the main command (train.py --algo grpo) leaves it


def frozen_answerer(args) -> str:
    """The Answer Agent that scores the manager: --answerer, else the main command's trained one where it is,
    else --model. The base SmolLM2 answers almost nothing right, whatever the bank (docs/method.md section 9): the
    manager's recipe trains the answerer first (paper: the agents co-adapt)."""
    if args.answerer:
        return args.answerer
    if MAIN_ANSWERER.is_dir() and args.data == "gym":
        print(f"frozen answerer: {MAIN_ANSWERER} (the main command's; --answerer to choose another)", file=sys.stderr)
        return str(MAIN_ANSWERER)
    print(f"frozen answerer: {args.model} (untrained: run python train.py --algo grpo first, or pass --answerer)",
          file=sys.stderr)
    return args.model


def manager_task(args, tok, base_model):
    """train.py's Task for --agent manager: examples from the train and val conversations, and the reward."""
    if args.reward == "prob" and args.distill:
        raise ValueError("--reward prob scores the gold answer right after **Answer:**: use --no-distill")
    embedder = make_embedder(args.embedder, base_model, tok)
    dtype, dev = base_model.lm_head.weight.dtype, base_model.lm_head.weight.device
    answerer = load_model(frozen_answerer(args), dtype, dev)[0]  # its own copy: the policy will change
    answerer.requires_grad_(False)
    dataset = DATASETS[args.data]
    convs = {c.sample_id: c for c in dataset.load_conversations()}
    vocab_size = base_model.lm_head.weight.shape[0] if args.guided else None
    answer_guide = guide_for(answer_automaton(args.distill), answerer, tok, args.guided)

    def examples(split):
        qs = dataset.load_split(split)
        out = []
        for conv_id in dict.fromkeys(q.conv_id for q in qs):
            conv = convs[conv_id]
            facts = conversation_facts(conv, args.facts, base_model, tok, guided=args.guided)
            out += manager_examples(conv, [q for q in qs if q.conv_id == conv_id], facts, tok, embedder,
                                    args.window, args.manager_k, vocab_size, args.manager_format, "shown")
        return out

    def score_many(pairs):
        return manager_score_many(pairs, answerer, tok, args, answer_guide)

    val, train = examples("val"), examples("train")
    if args.data == "gym":  # every kind of turn in any prefix (--val-limit), not the first session's introductions
        random.Random(0).shuffle(val)
    if args.balance_kinds:
        if args.data != "gym":
            raise ValueError("balance_kinds needs the gym's known operations (--data gym)")
        n = len(train)
        train = balanced_states(train, args.seed)
        print(f"balanced states: {len(train) // 2} ADD + {len(train) // 2} UPDATE-change training states of {n}",
              file=sys.stderr)
    return Task(train, val, lambda ex, texts: score_many([(ex, texts)])[0], score_many)


def manager_score(example, texts: list[str], answerer, tok, args, answer_guide=None) -> list[dict]:
    """manager_score_many for one prompt's outputs."""
    return manager_score_many([(example, texts)], answerer, tok, args, answer_guide)[0]


DECISIONS = ("ADD", "UPDATE", "DELETE", "NONE", "MIXED")


def manager_score_many(pairs: list[tuple], answerer, tok, args, answer_guide=None) -> list[list[dict]]:
    """Reward of each manager output, for (example, outputs) pairs: apply the output to a copy of the bank,
    let the frozen answerer answer the turn's questions (k + k retrieval), reward = the mean over them of
    its score: EM or F1 of its greedy answer, or (--reward prob) its probability of the gold answer, i.e.
    the chance that it answers exactly that when sampling: outcome reward, without a coin flip per question.
    Plus the event mix, the decision made (dec_*), the bank size, and on the gym the decision's accuracy.

    A GRPO group repeats its decisions: outputs that leave the bank the same are scored once, and the
    answerer's prompts of every pair go through it together (batches of val_batch).
    """
    k, fmt = args.memories_per_speaker, args.manager_format
    plan, needed = [], {}  # needed: (answer prompt, gold) -> its score, filled below
    for example, texts in pairs:
        meta = example.meta
        conv, bank, seen, rows = meta["conv"], meta["banks"][meta["speaker"]], {}, []
        for text in texts:
            edited, counts = apply_output(bank, text, meta["id_map"], meta["facts"], fmt)
            keys = []
            if counts["recovered"]:
                content = tuple((mid, m.text) for mid, m in edited.memories.items())
                if content not in seen:
                    banks = {**meta["banks"], meta["speaker"]: edited}
                    seen[content] = [(answer_prompt(conv, banks, q.question, k, args.distill, tok), q.answer)
                                     for q in meta["questions"]]
                keys = seen[content]
                needed.update(dict.fromkeys(keys))
            rows.append((counts, len(edited), decision(edited.log[len(bank.log):]), keys))
        plan.append((example, rows))
    needed = answer_scores(list(needed), answerer, tok, args, answer_guide)
    names = ("reward", "p_gold") if args.reward == "prob" else ("reward", "em", "f1")
    out = []
    for example, rows in plan:
        conv = example.meta["conv"]
        right = oracle_decision(conv, example.meta["dia_id"]) if conv.oracle else None
        scored = []
        for counts, size, made, keys in rows:
            n_events = sum(counts[op] for op in OPS) + counts["invalid"]
            row = dict.fromkeys(names, 0.0)  # an output from which no events came scores 0
            for key in keys:  # the mean over the questions
                for name in names:
                    row[name] += needed[key][name] / len(keys)
            row["parse_fail"] = float(counts["parse_fail"])
            row.update({op.lower(): counts[op] / max(n_events, 1) for op in OPS})
            row.update({"invalid_events": counts["invalid"] / max(n_events, 1), "bank_size": float(size)})
            row.update({f"dec_{d.lower()}": float(made[0] == d) for d in DECISIONS})
            if right is not None:  # the gym: the decision against the oracle's (kind and the memory it changes)
                row["op_acc"] = float(made == right)
                row[f"op_acc_{right[0].lower()}"] = row["op_acc"]  # recall of that kind; means skip absent keys
            scored.append(row)
        out.append(scored)
    return out


def answer_prompt(conv, banks: dict, question: str, k: int, distill: bool, tok) -> tuple:
    mems_a, mems_b = speaker_memories(conv, banks, question, k)
    return tuple(tok.chat(answer_messages(question, conv.speaker_a, mems_a, conv.speaker_b, mems_b, distill=distill)))


def answer_scores(keys: list[tuple], answerer, tok, args, answer_guide=None) -> dict:
    """(answer prompt, gold) -> the frozen answerer's score: {"reward", "em", "f1"} of its greedy answer, or
    with --reward prob {"reward", "p_gold"}: exp(log-prob of "**Answer:** <gold>" and then the end), at
    --reward-temperature."""
    out, B = {}, args.val_batch
    if args.reward == "prob":
        for i in range(0, len(keys), B):
            chunk = keys[i:i + B]
            golds = [tok.encode(f"**Answer:** {gold}") for _, gold in chunk]
            logps = continuation_logprobs(answerer, [list(p) for p, _ in chunk], golds, guide=answer_guide,
                                          temperature=args.reward_temperature)
            out.update({key: {"reward": math.exp(lp), "p_gold": math.exp(lp)} for key, lp in zip(chunk, logps)})
        return out
    prompts = list(dict.fromkeys(p for p, _ in keys))
    answers = {}
    for i in range(0, len(prompts), B):
        chunk = prompts[i:i + B]
        texts = generate(answerer, [list(p) for p in chunk], args.answer_max_new_tokens, temperature=0,
                         guide=answer_guide)
        answers.update(zip(chunk, (tok.decode(t) for t in texts)))
    return {(p, gold): score_answer(answers[p], gold, args.reward, args.require_marker) for p, gold in keys}
