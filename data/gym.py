"""The memory gym: synthetic two-person conversations whose answers hinge on ADD / UPDATE / DELETE.

    from data import gym
    convs = gym.load_conversations()          # train and val generated from their seeds, test from the frozen file
    train = gym.load_split("train")           # data.locomo.Question records, as data/locomo.py gives them
    conv.oracle["D3:5"]                       # the correct manager events for that fact turn, and a probe question

LoCoMo's questions rarely depend on a memory being updated, and nobody knows which operations would have
been right there. Here every conversation is generated from a small world of facts, so both are known, the
role bAbI played for memory networks. Two speakers each have single-valued attributes (city, job, car,
favourite food) and set-valued ones (dogs, languages, hobbies). Over the sessions a fact is

    introduced   "I live in Paris."                 -> ADD    "Alice lives in Paris"
    restated     "Still loving life in Paris."      -> NONE
    changed      "I just moved from Paris to Rome!" -> UPDATE "Alice moved from Paris to Rome on 8 May 2023"
    extended     "We got another dog, Scout!"       -> UPDATE "Alice has dogs named Buddy and Scout"
    retracted    "I sold my Fiat, no car now."      -> DELETE "Alice drives a Fiat"

mixed with small talk (no fact) and distractors: facts about a sister, a friend or a neighbour that share
the attributes' words ("Alice's sister lives in Oslo"). Turns are first person, observations (the
`observation` fact source, one per fact turn) third person. The questions ask about the state at the end
("Where does Alice live now?" -> "Rome"), in five categories: 1 a value never changed, 2 a value changed
at least once, 3 the members of a set, 4 the date of the latest change, 5 a retracted possession
("Does Alice still own a car?" -> "No"). Evidence = the turns that decide the answer.

For every fact turn, `oracle[dia_id]` holds the events that are correct given the oracle bank of the
preceding turns (bank ids as data/../memory.py's MemoryBank assigns them: "0", "1", ... per speaker), and a
probe: the question about that attribute with its answer right after the turn. Applying the events in
order gives banks without a stale fact; the manager's RL environment on the gym starts each turn from
them (agents.py). The files are LoCoMo's JSON schema plus an "oracle" key, so data/locomo.py parses them.

Splits by seed range (train 0-, val 10000-, test 20000-). The test split is read from a frozen file
(gym_test.json, sha256 below) so results stay comparable when the generator changes; regenerate it with
`python -m data.gym --write-test` only together with a new SHA256 and a note in docs/results.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from data.gym_families import FAMILIES, HELDOUT_FAMILIES
from data.locomo import DataError, Question, parse_conversation

TEST_FILE = Path(__file__).resolve().parent / "gym_test.json"
TEST_SHA256 = "20a869f07b01daef4a210055f5fab0dedecdd5b267410275dde007edbcceba36"
HELDOUT_FILE = TEST_FILE.with_name("gym_heldout.json")  # the test split's worlds in the held-out families' words
HELDOUT_SHA256 = "82c1923050d6c4b13a0ddbe2302c8b5fcad8ac69e81df47595d512520ea50ef0"
SEED_BASE = {"train": 0, "val": 10000, "test": 20000, "heldout": 20000}
CATEGORY_LABELS = {1: "unchanged", 2: "changed", 3: "set", 4: "date", 5: "retracted"}


@dataclass
class Level:
    """Difficulty knobs; the default is the level the runs in docs/results.md use (set on train and val)."""
    conversations: dict = None  # split -> number of conversations
    attributes: tuple = None  # what each speaker has, from SINGLE + SETS (default: all seven)
    sessions: int = 4  # session 1 introduces every attribute; the later ones change them
    events_per_session: int = 6  # fact turns per later session (changes, extensions, retractions, restatements)
    change_weight: float = 3.0  # how often an event changes a value, against restating one (weight 1)
    distractors: int = 2  # facts per speaker about somebody else, sharing the attributes' words
    small_talk: float = 0.5  # chance of a fact-free reply after each fact turn
    family: int = 0  # the wording (WORDS; 0: SAY, OBSERVE and DISTRACT below)

    def __post_init__(self):
        self.conversations = self.conversations or {"train": 24, "val": 8, "test": 24}
        self.attributes = tuple(self.attributes or SINGLE + SETS)


NAMES = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Imani", "Jonas", "Keiko", "Lars",
         "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sanjay", "Tara", "Umar", "Vera", "Wen", "Yusuf"]
VALUES = {
    "city": ["Paris", "Berlin", "Rome", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin", "Oslo", "Athens", "Warsaw",
             "Zurich", "Seattle", "Boston", "Denver", "Chicago", "Toronto", "Austin", "Sydney", "Tokyo"],
    "job": ["nurse", "teacher", "chef", "pilot", "plumber", "lawyer", "dentist", "architect", "baker", "journalist",
            "firefighter", "librarian", "pharmacist", "electrician", "accountant"],
    "car": ["Toyota", "Honda", "Ford", "Tesla", "Volvo", "Subaru", "Mazda", "Kia", "Fiat", "Jeep", "BMW", "Audi"],
    "food": ["sushi", "pizza", "tacos", "ramen", "curry", "pasta", "paella", "dumplings", "burgers", "pho", "lasagna",
             "falafel"],
    "dogs": ["Buddy", "Scout", "Max", "Luna", "Bella", "Charlie", "Rocky", "Daisy", "Milo", "Coco", "Teddy", "Rosie",
             "Bear", "Pepper", "Ziggy"],
    "languages": ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese", "Dutch", "Greek", "Polish",
                  "Swedish", "Korean", "Arabic"],
    "hobbies": ["hiking", "painting", "chess", "cycling", "knitting", "surfing", "gardening", "baking", "photography",
                "climbing", "pottery", "fishing", "swimming", "yoga"],
}
SINGLE = ("city", "job", "car", "food")
SETS = ("dogs", "languages", "hobbies")

# What a speaker says (first person) and what the observation records (third person), per attribute and kind.
SAY = {
    ("city", "intro"): ["I live in {v}.", "I've been living in {v} for a few years now.", "Home for me is {v}."],
    ("city", "change"): ["I just moved from {old} to {v}!", "Big news: I left {old} and moved to {v}.",
                         "We finally did it, goodbye {old}, hello {v}!"],
    ("city", "restate"): ["{v} is treating me well, I love living here.", "Still loving life in {v}."],
    ("job", "intro"): ["I work as a {v}.", "I'm a {v}, have been for years.", "My job? I'm a {v}."],
    ("job", "change"): ["I quit being a {old} and started working as a {v}!",
                        "New job! I'm a {v} now, no more {old} work."],
    ("job", "restate"): ["Work as a {v} keeps me busy.", "Another long week as a {v}."],
    ("car", "intro"): ["I drive a {v}.", "My car is a {v}.", "I get around in my {v}."],
    ("car", "change"): ["I sold my {old} and bought a {v}!", "Traded in the {old}, I drive a {v} now."],
    ("car", "retract"): ["I sold my {old}, I don't have a car anymore.", "Got rid of the {old}, no car for me now."],
    ("car", "restate"): ["My {v} still runs great.", "Took the {v} for a long drive this weekend."],
    ("food", "intro"): ["My favourite food is {v}.", "Nothing beats {v} for me."],
    ("food", "change"): ["I used to love {old}, but now {v} is my favourite food.",
                         "Honestly {v} has replaced {old} as my favourite food."],
    ("food", "restate"): ["Had {v} again last night, still my favourite.", "Still can't get enough of {v}."],
    ("dogs", "intro"): ["I have a dog named {v}.", "My dog {v} says hi!"],
    ("dogs", "extend"): ["We got another dog, {v}!", "Say hi to {v}, our new dog."],
    ("languages", "intro"): ["I speak {v}.", "I grew up speaking {v}."],
    ("languages", "extend"): ["I've learned to speak {v} too!", "My {v} is finally good enough to chat."],
    ("hobbies", "intro"): ["I love {v}.", "In my free time I do a lot of {v}."],
    ("hobbies", "extend"): ["I took up {v} recently.", "Guess what, I started {v}!"],
}
OBSERVE = {
    ("city", "intro"): "{p} lives in {v}", ("city", "change"): "{p} moved from {old} to {v} on {date}",
    ("job", "intro"): "{p} works as a {v}",
    ("job", "change"): "{p} stopped working as a {old} and started working as a {v} on {date}",
    ("car", "intro"): "{p} drives a {v}", ("car", "change"): "{p} sold the {old} and now drives a {v}",
    ("car", "retract"): "{p} sold the {old} and no longer owns a car",
    ("food", "intro"): "{p}'s favourite food is {v}",
    ("food", "change"): "{p}'s favourite food is now {v} instead of {old}",
    ("dogs", "intro"): "{p} has a dog named {v}", ("dogs", "extend"): "{p} got another dog named {v}",
    ("languages", "intro"): "{p} speaks {v}", ("languages", "extend"): "{p} learned to speak {v} too",
    ("hobbies", "intro"): "{p} enjoys {v}", ("hobbies", "extend"): "{p} took up {v} as a new hobby",
}
# A set's memory after a merge: all members in the order they came.
MERGED = {"dogs": "{p} has dogs named {v}", "languages": "{p} speaks {v}", "hobbies": "{p} enjoys {v}"}
QUESTION = {"city": "Where does {p} live now?", "job": "What is {p}'s job now?", "car": "What car does {p} drive now?",
            "food": "What is {p}'s favourite food now?", "dogs": "What are the names of {p}'s dogs?",
            "languages": "Which languages does {p} speak?", "hobbies": "What are {p}'s hobbies?"}
WHEN = {"city": "When did {p} move to {v}?", "job": "When did {p} start working as a {v}?"}
RETRACTED = "Does {p} still own a car?"
DISTRACT = [("My sister lives in {city}.", "{p}'s sister lives in {city}"),
            ("My best friend works as a {job}.", "{p}'s best friend works as a {job}"),
            ("My neighbour just bought a {car}.", "{p}'s neighbour bought a {car}"),
            ("My brother has a dog named {dogs}.", "{p}'s brother has a dog named {dogs}"),
            ("My cousin speaks {languages}.", "{p}'s cousin speaks {languages}"),
            ("My roommate is really into {hobbies}.", "{p}'s roommate enjoys {hobbies}")]
SMALL_TALK = ["That's great to hear!", "Haha, nice.", "Wow, tell me more sometime.", "I'm glad things are going well.",
              "Same here, it's been a busy week.", "Oh really? Good for you.", "Ha, that sounds like you.",
              "Nice! Let's catch up properly soon.", "Hey, good to hear from you again!", "Interesting!"]
# Every phrasing family's words (data/gym_families.py), family 0 the ones above; a conversation is written in one.
WORDS = {0: dict(say=SAY, observe=OBSERVE, distract=DISTRACT), **FAMILIES}



def join(items: list[str]) -> str:
    """["a"] -> "a"; ["a", "b", "c"] -> "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def upper_first(text: str) -> str:
    """"photography is a hobby of Jonas" -> "Photography is ..." (family 0's sentences all start upper case)."""
    return text[:1].upper() + text[1:]


def day_text(when: datetime) -> str:
    return f"{when.day} {when:%B %Y}"  # "8 May 2023": how facts and gold dates write a day


class World:
    """One conversation being written: the speakers' current state, the turns, and each bank as the oracle
    keeps it (memory id -> (attribute or None, text)), so every fact turn gets its correct events."""

    def __init__(self, rng: random.Random, names: list[str], family: int = 0):
        self.rng, self.names = rng, names
        self.words = WORDS[family]  # say, observe and distract templates
        self.state = {p: {} for p in names}  # person -> attribute -> value (single) or list (set)
        self.bank = {p: {} for p in names}  # person -> memory id -> (attribute or None, text)
        self.next_id = {p: 0 for p in names}
        self.memory_of = {p: {} for p in names}  # person -> attribute -> memory id
        self.changed_at = {p: {} for p in names}  # person -> attribute -> (dia_id, date text) of the last change
        self.decided_by = {p: {} for p in names}  # person -> attribute -> evidence dia_ids
        self.retracted = {p: None for p in names}  # person -> dia_id of the car's retraction
        self.sessions, self.observations, self.oracle = [], {}, {}

    def say(self, person: str, text: str, fact: str | None = None, events=None) -> str:
        session = self.sessions[-1]
        dia_id = f"D{session['index']}:{len(session['turns']) + 1}"
        session["turns"].append({"speaker": person, "dia_id": dia_id, "text": text})
        if fact is not None:
            self.observations.setdefault(session["index"], {}).setdefault(person, []).append([fact, dia_id])
            self.oracle[dia_id] = {"speaker": person, "events": events, "probe": None}  # fact_turn sets the probe
        return dia_id

    def add(self, person: str, attr: str | None, text: str) -> list[dict]:
        mid = str(self.next_id[person])
        self.next_id[person] += 1
        self.bank[person][mid] = (attr, text)
        if attr is not None:
            self.memory_of[person][attr] = mid
        return [{"id": mid, "text": text, "event": "ADD"}]

    def update(self, person: str, attr: str, text: str) -> list[dict]:
        mid = self.memory_of[person][attr]
        old = self.bank[person][mid][1]
        self.bank[person][mid] = (attr, text)
        return [{"id": mid, "text": text, "event": "UPDATE", "old_memory": old}]

    def delete(self, person: str, attr: str) -> list[dict]:
        mid = self.memory_of[person].pop(attr)
        return [{"id": mid, "text": self.bank[person].pop(mid)[1], "event": "DELETE"}]

    def reply(self, speaker: str, chance: float) -> None:
        if self.rng.random() < chance:
            other = self.names[1 - self.names.index(speaker)]
            self.say(other, self.rng.choice(SMALL_TALK))

    def fact_turn(self, person: str, attr: str, kind: str, date: str) -> None:
        """One fact turn: the state changes, the speaker says it, the oracle records the right events."""
        rng, st = self.rng, self.state[person]
        old = st.get(attr)
        if kind in ("intro", "extend"):
            v = rng.choice([x for x in VALUES[attr] if x not in (old or [])])
        elif kind == "change":
            v = rng.choice([x for x in VALUES[attr] if x != old])
        else:  # restate, retract
            v = old[-1] if isinstance(old, list) else old
        i = rng.randrange(len(SAY[(attr, kind)]))  # family 0's draw in every family: the same world follows
        options = self.words["say"][(attr, kind)]
        text = upper_first(options[i % len(options)].format(v=v, old=old))
        observe = self.words["observe"]
        template = observe.get((attr, kind), observe[(attr, "intro")])
        fact = upper_first(template.format(p=person, v=v, old=old, date=date))
        if kind == "intro":
            st[attr] = [v] if attr in SETS else v
            events = self.add(person, attr, fact)
        elif kind == "restate":
            mid = self.memory_of[person][attr]
            events = [{"id": mid, "text": self.bank[person][mid][1], "event": "NONE"}]
        elif kind == "change":
            st[attr] = v
            events = self.update(person, attr, fact)
        elif kind == "extend":
            st[attr] = old + [v]
            events = self.update(person, attr, MERGED[attr].format(p=person, v=join(st[attr])))
        else:  # retract
            del st[attr]
            events = self.delete(person, attr)
        dia_id = self.say(person, text, fact, events)
        self.oracle[dia_id]["probe"] = self.question(person, attr)
        if kind == "change":
            self.changed_at[person][attr] = (dia_id, date)
        if kind == "retract":
            self.retracted[person] = dia_id
        if kind in ("intro", "change", "retract"):
            self.decided_by[person][attr] = [dia_id]
        elif kind == "extend":
            self.decided_by[person][attr].append(dia_id)

    def question(self, person: str, attr: str) -> dict:
        """The question about `attr` of `person` and its answer as of now."""
        if attr == "car" and "car" not in self.state[person]:
            return {"question": RETRACTED.format(p=person), "answer": "No", "category": 5}
        value = self.state[person][attr]
        answer = join(value) if attr in SETS else value
        category = 3 if attr in SETS else 2 if attr in self.changed_at[person] else 1
        return {"question": QUESTION[attr].format(p=person), "answer": answer, "category": category}


def generate_conversation(seed: int, split: str, level: Level | None = None) -> dict:
    """One conversation in LoCoMo's JSON schema (plus "oracle"), a function of (split, seed) and the level."""
    level = level or Level()
    rng = random.Random(f"gym-{split}-{seed}")
    names = rng.sample(NAMES, 2)
    world = World(rng, names, level.family)
    when = datetime(2023, 1, 1) + timedelta(days=rng.randrange(365), hours=rng.randrange(9, 21),
                                            minutes=rng.randrange(60))
    for index in range(1, level.sessions + 1):
        world.sessions.append({"index": index, "date": when, "turns": []})
        date = day_text(when)
        world.say(names[index % 2], rng.choice(SMALL_TALK[-2:]))
        if index == 1:  # every attribute introduced, the speakers taking turns
            intros = [(p, a) for p in names for a in level.attributes]
            rng.shuffle(intros)
            for person, attr in intros:
                world.fact_turn(person, attr, "intro", date)
                world.reply(person, level.small_talk)
        else:
            for _ in range(level.events_per_session):
                person = rng.choice(names)
                world.fact_turn(person, *pick_event(rng, world.state[person], level), date)
                world.reply(person, level.small_talk)
        if index == level.sessions // 2 or index == level.sessions:  # distractors, halfway and at the end
            for person in names:
                for j in rng.sample(range(len(DISTRACT)), level.distractors // 2 + (index == level.sessions) *
                                    (level.distractors % 2)):
                    say, fact = world.words["distract"][j]
                    values = {a: rng.choice(VALUES[a]) for a in VALUES}
                    text = upper_first(fact.format(p=person, **values))
                    world.say(person, upper_first(say.format(**values)), text, world.add(person, None, text))
        when += timedelta(days=rng.randrange(7, 40), hours=rng.randrange(-3, 4), minutes=rng.randrange(60))
    return to_locomo(world, f"gym-{split}-{seed:05d}", level.attributes)


def pick_event(rng: random.Random, state: dict, level: Level) -> tuple[str, str]:
    """(attribute, kind) of the next fact turn: changes and extensions weigh `change_weight`, restatements 1,
    a retraction (the car, if any) as much as a change of one attribute."""
    options, weights = [], []
    for attr in SINGLE:
        if attr in state:
            options += [(attr, "change"), (attr, "restate")]
            weights += [level.change_weight, 1.0]
    for attr in SETS:
        if attr in state and len(state[attr]) < 3:
            options.append((attr, "extend"))
            weights.append(level.change_weight)
    if "car" in state:
        options.append(("car", "retract"))
        weights.append(level.change_weight / 2)
    return rng.choices(options, weights)[0]


def to_locomo(world: World, sample_id: str, attributes: tuple) -> dict:
    """The conversation in LoCoMo's schema: sessions with date texts, observations, qa with evidence."""
    a, b = world.names
    conv = {"speaker_a": a, "speaker_b": b}
    for s in world.sessions:
        conv[f"session_{s['index']}"] = s["turns"]
        conv[f"session_{s['index']}_date_time"] = f"{s['date']:%-I:%M %p on %-d %B, %Y}".replace("AM", "am") \
            .replace("PM", "pm")
    qa = []
    for person in world.names:
        for attr in attributes:
            last = world.question(person, attr)
            if last["category"] == 5:
                qa.append({**last, "evidence": [world.retracted[person]]})
                continue
            if attr in world.changed_at[person]:
                last["category"] = 2
            qa.append({**last, "evidence": world.decided_by[person][attr]})
            if attr in WHEN and attr in world.changed_at[person]:
                dia_id, date = world.changed_at[person][attr]
                qa.append({"question": WHEN[attr].format(p=person, v=world.state[person][attr]), "answer": date,
                           "category": 4, "evidence": [dia_id]})
    observation = {f"session_{s}_observation": facts for s, facts in world.observations.items()}
    return {"sample_id": sample_id, "conversation": conv, "observation": observation, "qa": qa,
            "oracle": world.oracle}


# --------------------------------------------------------------------------------------------------
# Loading: the same functions and types as data/locomo.py
# --------------------------------------------------------------------------------------------------


def generate_split(split: str, level: Level | None = None) -> list[dict]:
    level = level or Level()
    if split == "heldout":  # the test split's worlds (its seeds), each worded by one held-out family in turn
        out = []
        for i in range(level.conversations["test"]):
            family = HELDOUT_FAMILIES[i % len(HELDOUT_FAMILIES)]
            conv = generate_conversation(SEED_BASE["test"] + i, "test", replace(level, family=family))
            out.append({**conv, "sample_id": conv["sample_id"].replace("-test-", "-heldout-")})
        return out
    return [generate_conversation(SEED_BASE[split] + i, split, level) for i in range(level.conversations[split])]


def check_test_file(path: Path, sha256: str = TEST_SHA256) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: the gym's frozen test file is missing; restore it from git "
                        "(python -m data.gym --write-test makes a new one, with a new sha256)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise DataError(f"{path}: sha256 {digest[:12]}... is not the frozen test file's {sha256[:12]}... "
                        "(edited or regenerated); restore it from git")
    return json.loads(path.read_text())


def load_conversations(path: Path | None = None, splits=("train", "val", "test", "heldout")):
    """Conversations (data.locomo.Conversation) of the given splits: train and val generated, test and heldout
    frozen (`path` replaces the test file)."""
    samples = []
    for split in splits:
        if split == "test":
            samples += check_test_file(Path(path or TEST_FILE))
        elif split == "heldout":
            samples += check_test_file(HELDOUT_FILE, HELDOUT_SHA256)
        else:
            samples += generate_split(split)
    return [parse_conversation(s) for s in samples]


def split_of(sample_id: str) -> str:
    return sample_id.split("-")[1]


def load_split(name: str, path: Path | None = None) -> list[Question]:
    """Question records of "train", "val", "test" or "heldout", conversation by conversation, in file order."""
    if name not in SEED_BASE:
        raise ValueError(f"unknown split {name!r}: use 'train', 'val', 'test' or 'heldout'")
    return [Question(qa["question"], str(qa["answer"]), int(qa["category"]), list(qa["evidence"]), conv.sample_id, i)
            for conv in load_conversations(path, (name,)) for i, qa in enumerate(conv.qa)]


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the frozen test file, or print a sample conversation.")
    ap.add_argument("--write-test", action="store_true", help=f"write {TEST_FILE.name} and print its sha256")
    ap.add_argument("--write-heldout", action="store_true", help=f"write {HELDOUT_FILE.name} and print its sha256")
    ap.add_argument("--show", type=int, default=None, help="print train conversation SEED as text")
    args = ap.parse_args()
    for split, dest in (("test", TEST_FILE), ("heldout", HELDOUT_FILE)):
        if getattr(args, f"write_{split}"):
            text = json.dumps(generate_split(split), indent=1, ensure_ascii=False) + "\n"
            tmp = dest.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(dest)
            print(f"{dest}: {len(text)} bytes, sha256 {hashlib.sha256(text.encode()).hexdigest()}")
    if args.show is not None:
        sample = generate_conversation(args.show, "train")
        conv = sample["conversation"]
        for key, turns in conv.items():
            if isinstance(turns, list):
                print(f"--- {key} ({conv[key + '_date_time']})")
                for t in turns:
                    o = sample["oracle"].get(t["dia_id"])
                    ops = " ".join(f"{e['event']}:{e['id']}" for e in o["events"]) if o else ""
                    print(f"{t['dia_id']:>6} {t['speaker']}: {t['text']}   {ops}")
        for qa in sample["qa"]:
            print(f"[{qa['category']} {CATEGORY_LABELS[qa['category']]}] {qa['question']} -> {qa['answer']} "
                  f"{qa['evidence']}")


if __name__ == "__main__":
    main()
