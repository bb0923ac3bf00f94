"""LongMemEval, oracle version: the paper's zero-shot generalisation test, in data/locomo.py's types.

    from data import longmemeval
    convs = longmemeval.load_conversations()     # 500 Conversation objects: one per question, its evidence sessions
    qs = longmemeval.load_split("test")          # 500 Question records; category = the task type

Memory-R1 trains on LoCoMo only and evaluates the same agents on LongMemEval's oracle file (only the
evidence sessions of each question's history) with F1 / BLEU-1 / J per task type (the paper's results,
docs/method.md section 4). Each item of the published JSON (question_id, question_type, question, answer,
question_date, haystack_session_ids, haystack_dates, haystack_sessions of {role, content, has_answer},
answer_session_ids) becomes one two-speaker Conversation, "user" and "assistant", its sessions in date
order (the oracle file does not sort them), and one Question:

- category: the task type (CATEGORY_LABELS); abstention items (question_id ending in "_abs") keep their
  task type, as the paper reports them;
- evidence: the turns marked has_answer, else every turn of the answer sessions;
- the question's date is appended to its text ("(asked on 2023/05/30 (Tue) 23:40)"): temporal
  questions ("how many days ago ...") cannot be answered without it;
- no observations ship with the dataset, so facts come from the `turn` source (evaluate.py's default here).

The file (~15 MB) is not committed: `load_conversations()` downloads it with huggingface_hub from the
dataset repo below at a pinned revision, checks its sha256 and writes it atomically to data/; offline, the
error says where to put a copy by hand. The revision and sha256 are those a public project pins for the
same file; this project's machines cannot reach the hub, so they were not re-checked here.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

from data.locomo import Conversation, DataError, Question, Session, Turn

REPO = "xiaowu0162/longmemeval-cleaned"  # Hugging Face dataset repo (Wu et al., ICLR 2025)
FILE = "longmemeval_oracle.json"
REVISION = "98d7416c24c778c2fee6e6f3006e7a073259d48f"
SHA256 = "821a2034d219ab45846873dd14c14f12cfe7776e73527a483f9dac095d38620c"
DATA_FILE = Path(__file__).resolve().parent / FILE
TASKS = ("single-session-user", "single-session-assistant", "single-session-preference", "multi-session",
         "knowledge-update", "temporal-reasoning")
CATEGORY_LABELS = {i + 1: task for i, task in enumerate(TASKS)}
DATE_FORMAT = "%Y/%m/%d (%a) %H:%M"  # "2023/05/20 (Sat) 02:21"
KEYS = ("question_id", "question_type", "question", "answer", "question_date", "haystack_dates",
        "haystack_sessions", "answer_session_ids", "haystack_session_ids")


def parse_date(text: str) -> datetime | None:
    try:
        return datetime.strptime(text.strip(), DATE_FORMAT)
    except (ValueError, AttributeError):
        return None


def download(path: Path) -> None:
    """The oracle file from the hub at the pinned revision, checked, then moved into place atomically."""
    try:
        from huggingface_hub import hf_hub_download
        got = Path(hf_hub_download(REPO, FILE, repo_type="dataset", revision=REVISION))
    except Exception as e:
        raise DataError(f"{path}: not found, and downloading {FILE} (revision {REVISION[:10]}) from the Hugging Face "
                        f"dataset {REPO} failed ({type(e).__name__}); download it elsewhere and copy it to {path}, "
                        f"or pass --data-file") from None
    check_sha256(got)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(got.read_bytes())
    os.replace(tmp, path)  # a half-written file never carries the real name


def check_sha256(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise DataError(f"{path}: sha256 {digest[:12]}... is not that of {FILE} at revision {REVISION[:10]} "
                        f"({SHA256[:12]}...): truncated, corrupt or another version; delete it to download it again")


def parse_item(item: dict) -> tuple[Conversation, Question]:
    """One published item as (conversation of its evidence sessions, its question)."""
    qid = str(item["question_id"])
    if item["question_type"] not in TASKS:
        raise ValueError(f"unknown question_type {item['question_type']!r}")
    sessions = list(zip(item["haystack_dates"], item["haystack_session_ids"], item["haystack_sessions"], strict=True))
    sessions.sort(key=lambda s: parse_date(s[0]) or datetime.min)  # the oracle file lists them unsorted
    answer_sessions = set(map(str, item["answer_session_ids"]))
    out, marked, in_answer_sessions = [], [], []
    for n, (date_text, session_id, turns) in enumerate(sessions, start=1):
        when = parse_date(date_text)
        rows = []
        for t, turn in enumerate(turns, start=1):
            dia_id = f"D{n}:{t}"
            rows.append(Turn(dia_id, str(turn["role"]), str(turn["content"]), n, when))
            if turn.get("has_answer"):
                marked.append(dia_id)
            if str(session_id) in answer_sessions:
                in_answer_sessions.append(dia_id)
        out.append(Session(n, when, date_text, rows))
    conv = Conversation(qid, "user", "assistant", out, [], [])
    question = f"{item['question']} (asked on {item['question_date']})"
    return conv, Question(question, str(item["answer"]), TASKS.index(item["question_type"]) + 1,
                          marked or in_answer_sessions, qid, 0)


def read(path: Path | None = None) -> list[tuple[Conversation, Question]]:
    if path is None:
        path = DATA_FILE
        if not path.exists():
            download(path)
        check_sha256(path)
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such LongMemEval file")
    try:
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise TypeError("the file is not a list of items")
        return [parse_item(item) for item in items]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at character {e.pos}): truncated or corrupt") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not in LongMemEval's format ({type(e).__name__}: {e}); each item needs "
                        f"{', '.join(KEYS)}") from None


def load_conversations(path: Path | None = None) -> list[Conversation]:
    return [conv for conv, _ in read(path)]


def load_split(name: str, path: Path | None = None) -> list[Question]:
    """Every question ("test"): LongMemEval is a zero-shot test, with no training or validation split."""
    if name != "test":
        raise DataError(f"LongMemEval has only a test split (got {name!r}): Memory-R1 trains on LoCoMo "
                         "(or the gym) and evaluates here zero-shot")
    return [q for _, q in read(path)]
