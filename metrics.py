"""The paper's metrics (docs/method.md section 3): the RL reward, the scores of its tables, and the LLM judge.

    exact_match(pred, gold)          SQuAD normalisation, the RL reward (docs/method.md section 1)
    f1(pred, gold)                   Mem0's token-set F1, the F1 of the paper's tables
    bleu1(pred, gold)                NLTK sentence_bleu, weights (1,0,0,0), smoothing method1, Treebank tokens
    locomo_f1(pred, gold, category)  the official LoCoMo F1 (stemmed, per category), always labelled as such
    HTTPJudge / LocalJudge           the LLM judge (J) with Mem0's judge prompt: CORRECT or WRONG
    evidence_recall(...)             how many of a question's evidence turns reached the retrieved memories

Rewards (agents.py) and the evaluation command (evaluate.py) both score with these.
Read next: checkpoint.py, evaluate.py, then model.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import socket
import string
import sys
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from nltk.stem import PorterStemmer  # the stemmer LoCoMo's own F1 uses (README, "Dependencies")

from grpo import zero_std_group_fraction
from model import load_model
from parallel import all_sum, gather_lists
from sampling import generate

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
    """Mem0's token-set F1 (docs/method.md section 3): overlap of token sets; empty prediction or gold -> 0."""
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
        return LocalJudge(*load_model(args.judge_checkpoint))
    return None


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def mean_scores(scores: list[dict], prefix: str = "") -> dict:
    """Each key's mean over the scores that have it (a gym manager's op_acc_update: over UPDATE turns only)."""
    keys = dict.fromkeys(k for s in scores for k in s)
    return {prefix + k: sum(vals) / len(vals) for k in keys if (vals := [s[k] for s in scores if k in s])}


def standard_error(values: list[float]) -> float:
    """Of the mean of `values` (sample standard deviation / sqrt(n)): the noise of a held-out figure."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def rollout_stats(groups: list, args, stop_ids) -> dict:
    """Means over a training step's groups (train.Group; every rank's): the scores, the reward's spread, lengths, and
    for PPO the rollout's KL to the reference (k1: what the reward is penalised by)."""
    stops = set(stop_ids)
    mine = {"scores": [s for g in groups for s in g.scores],
            "group_rewards": [sum(s["reward"] for s in g.scores) / len(g.scores) for g in groups],
            "lengths": [len(c) for g in groups for c in g.completions],
            "truncated": [len(c) == args.max_new_tokens and c[-1] not in stops for g in groups for c in g.completions]}
    every = gather_lists(mine)
    rewards = torch.tensor([s["reward"] for s in every["scores"]])
    stats = mean_scores(every["scores"])  # reward first, then em, f1, parse_fail, ...
    stats.update({"reward_se": standard_error(every["group_rewards"]),  # over prompts: groups are independent
                  "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
                  "zero_std_groups": zero_std_group_fraction(rewards, args.group_size) if args.group_size > 1 else 1.0,
                  "response_len": sum(every["lengths"]) / len(every["lengths"]),
                  "truncated": sum(every["truncated"]) / len(every["truncated"])})
    if args.algo == "ppo" and groups[0].ref_logp is not None:  # k1 at rollout time: what the reward is penalised by
        kl, n = all_sum([torch.cat([(g.old_logp - g.ref_logp)[g.mask] for g in groups]).sum().item(),
                         sum(g.mask.sum().item() for g in groups)])
        stats["kl"] = kl / n
    return stats


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def held_out_summary(path: Path) -> str:
    """From a run's metrics.jsonl: validation before training and at the last step, each with its standard
    error (train.py prints it at the end of a run: did training help, beyond the noise?)."""
    rows = [r for r in map(json.loads, Path(path).read_text().splitlines()) if "val_reward" in r]
    if len(rows) < 2:
        return "validation: fewer than two validations in the log"
    first, last = rows[0], rows[-1]
    lines = [f"validation on {last.get('val_n', '?')} held-out prompts (mean +- standard error):"]
    for key in ("f1", "em") if "val_f1" in first else ("reward", "em"):  # the answerer's reward may turn F1 to EM
        if f"val_{key}" in first:
            a, b = first[f"val_{key}"], last[f"val_{key}"]
            lines.append(f"  {key:6s} step {first['step']}: {a:.3f} +- {first.get(f'val_{key}_se', 0.0):.3f}   "
                         f"step {last['step']}: {b:.3f} +- {last.get(f'val_{key}_se', 0.0):.3f}   "
                         f"change {b - a:+.3f}")
    return "\n".join(lines)


def evidence_recall(evidence: list[str], retrieved: list[dict]) -> float | None:
    """Fraction of a question's evidence turns (dia_ids) that some retrieved memory came from.

    Low recall means the memory lost the fact (not the answerer); None when a question has no evidence.
    """
    if not evidence:
        return None
    found = {d for m in retrieved for d in m.get("dia_ids", [])}
    return sum(e in found for e in evidence) / len(evidence)
