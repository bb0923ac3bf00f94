"""LoCoMo: conversations, their dataset-written facts, and the Memory-R1 question split (docs/method.md section 2).

    from data.locomo import load_conversations, load_split
    convs = load_conversations()            # 10 Conversation objects, sessions and turns in order
    train = load_split("train")             # 152 Question records from conv-26 (categories 1-4)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "locomo10.json"
SHA256 = "79fa87e90f04081343b8c8debecb80a9a6842b76a7aa537dc9fdf651ea698ff4"
MIRROR = ("KimmoZZZ/locomo", "locomo10.json")  # Hugging Face dataset repo and file (data/README.md)

# Memory-R1's conversation-level split (docs/method.md section 2); test = every other conversation.
SPLIT_CONVERSATIONS = {"train": ("conv-26",), "val": ("conv-30",)}
# The paper's table labels (the LoCoMo paper names 1 and 4 the other way round; always print the ids too).
CATEGORY_LABELS = {1: "single-hop", 2: "temporal", 3: "multi-hop", 4: "open-domain", 5: "adversarial"}
DATE_FORMAT = "%I:%M %p on %d %B, %Y"  # "1:56 pm on 8 May, 2023"


class DataError(ValueError):
    """The LoCoMo file is missing, corrupt, or not LoCoMo; the message says which and what to do."""


@dataclass
class Turn:
    dia_id: str  # "D<session>:<turn>"
    speaker: str
    text: str  # an image turn carries its caption: "... [shares a photo of <blip_caption>]"
    session: int
    date_time: datetime | None


@dataclass
class Session:
    index: int
    date_time: datetime | None
    date_text: str  # as written in the file, for prompts
    turns: list[Turn]


@dataclass
class Fact:
    speaker: str
    text: str
    dia_ids: list[str]
    session: int


@dataclass
class Conversation:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[Session]
    observations: list[Fact]  # the dataset authors' facts per turn (the `observation` fact source)
    qa: list[dict] = field(repr=False)
    # dia_id of a fact turn -> {"speaker", "events": the correct manager events, "probe": a question}; only where
    # the right operations are known (the memory gym, data/gym.py), empty for LoCoMo
    oracle: dict = field(default_factory=dict, repr=False)

    def turns(self) -> list[Turn]:
        return [t for s in self.sessions for t in s.turns]


@dataclass
class Question:
    question: str
    answer: str  # always a string (six gold answers are ints in the file)
    category: int
    evidence: list[str]  # normalised dia_ids
    conv_id: str
    index: int  # position in the conversation's qa list (file order)


def parse_date(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text.strip(), DATE_FORMAT) if text else None
    except ValueError:
        return None


def normalise_evidence(items) -> list[str]:
    """Evidence ids as "D<s>:<t>"; the file also has "D8:6; D9:17", "D9:1 D4:4", "D:11:26" and a bare "D"."""
    out = []
    for item in items or []:
        for piece in re.split(r"[;,\s]+", str(item)):
            m = re.fullmatch(r"D:?(\d+):(\d+)", piece.strip())
            if m:
                out.append(f"D{int(m.group(1))}:{int(m.group(2))}")
    return list(dict.fromkeys(out))


def turn_text(raw: dict) -> str:
    """The turn as a text model sees it: an image turn adds "[shares a photo of <caption>]" (docs/method.md section 2).

    BLIP captions mostly begin with "a photo of" already; that prefix is dropped so it is not said twice.
    """
    text = raw.get("text", "")
    caption = str(raw.get("blip_caption") or "").strip()
    if caption:
        caption = re.sub(r"^(a )?(photo|picture|image) of ", "", caption, flags=re.I)
        text = f"{text} [shares a photo of {caption}]".strip()
    return text


def check_file(path: Path) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise DataError(f"{path}: sha256 {digest[:12]}... is not LoCoMo's {SHA256[:12]}... (corrupt or a "
                        "different file); delete it to download it again")


def ensure_file(path: Path | None = None) -> Path:
    """The LoCoMo file, downloaded from the mirror (and checked) when absent."""
    path = Path(path) if path is not None else DATA_FILE
    if not path.exists():
        try:
            from huggingface_hub import hf_hub_download
            got = Path(hf_hub_download(MIRROR[0], MIRROR[1], repo_type="dataset"))
        except Exception as e:
            raise DataError(f"{path}: not found, and downloading {MIRROR[1]} from the Hugging Face dataset "
                            f"{MIRROR[0]} failed ({type(e).__name__}); copy locomo10.json there by hand") from None
        check_file(got)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(got.read_bytes())
        tmp.replace(path)  # atomic: a half-written file never carries the real name
    check_file(path)
    return path


def parse_conversation(sample: dict) -> Conversation:
    conv = sample["conversation"]
    numbers = sorted(int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k)))
    sessions = []
    for n in numbers:  # some samples carry more date keys than sessions: iterate the sessions
        date_text = conv.get(f"session_{n}_date_time", "")
        when = parse_date(date_text)
        turns = [Turn(t["dia_id"], t["speaker"], turn_text(t), n, when) for t in conv[f"session_{n}"]]
        sessions.append(Session(n, when, date_text, turns))
    facts = []
    for key, per_speaker in (sample.get("observation") or {}).items():
        m = re.fullmatch(r"session_(\d+)_observation", key)
        for speaker, pairs in (per_speaker or {}).items():
            for pair in pairs:
                facts.append(Fact(speaker, pair[0], normalise_evidence(pair[1:]), int(m.group(1)) if m else 0))
    facts.sort(key=lambda f: f.session)
    return Conversation(sample["sample_id"], conv["speaker_a"], conv["speaker_b"], sessions, facts, sample["qa"],
                        sample.get("oracle", {}))


def load_conversations(path: Path | None = None) -> list[Conversation]:
    path = ensure_file(path)
    try:
        samples = json.loads(path.read_text())
        return [parse_conversation(s) for s in samples]
    except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
        raise DataError(f"{path}: not in LoCoMo's format ({type(e).__name__}: {e})") from None


def split_of(sample_id: str) -> str:
    for name, ids in SPLIT_CONVERSATIONS.items():
        if sample_id in ids:
            return name
    return "test"


def load_split(name: str, path: Path | None = None, include_adversarial: bool = False) -> list[Question]:
    """Question records of "train", "val" or "test", in file order; category 5 only when asked for."""
    if name not in ("train", "val", "test"):
        raise ValueError(f"unknown split {name!r}: use 'train', 'val' or 'test'")
    out = []
    for conv in load_conversations(path):
        if split_of(conv.sample_id) != name:
            continue
        for i, qa in enumerate(conv.qa):
            cat = int(qa["category"])
            if cat == 5 and not include_adversarial:
                continue
            answer = qa.get("answer", qa.get("adversarial_answer"))
            out.append(Question(qa["question"], "" if answer is None else str(answer), cat,
                                normalise_evidence(qa.get("evidence")), conv.sample_id, i))
    return out
