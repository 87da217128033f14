"""Write a personalization data set for per-user adapters, under `runs/data/users/` (git-ignored), from
`../shared/data/`: six "users", each its own domain and task, so that one adapter per user has something of its own
to learn and a mixed batch holds rows that need different adapters.

    python examples/prepare_users.py                      # from anywhere; stdlib only, ~1 s, same bytes every run
    python examples/prepare_users.py --output runs/data/users-b

| user | source: train / held out | input -> output |
|---|---|---|
| legal | CUAD `master_clauses.csv`, by contract | a clause -> its governing law, date, renewal term or notice period |
| medical | PubMedQA PQA-L, 500 non-test PMIDs | question + abstract -> "Yes."/"No."/"Maybe." + the conclusion |
| e2e | E2E `trainset.csv` / `devset.csv` | `name[...], food[...]` -> a description (one record per MR) |
| dialogsum | DialogSum dev (the only split here) | a dialogue -> its summary |
| scitldr | SciTLDR-A `train.jsonl` / `dev.jsonl` | an abstract -> its TL;DR (the first target) |
| zh | Alpaca, Chinese fields, parts 0-9 | a Chinese instruction (+ input) -> its answer |

What it writes:

- `train.jsonl`: `TRAIN_PER_USER` (160) records of each user, all users shuffled together.
- `heldout/<user>.jsonl`: `HELDOUT_PER_USER` (40) other records of that user, in source order.

Each line is `{"user": ..., "instruction": ..., "input": ..., "output": ...}`: an instruction record that `loraforge
train` reads as it is (the format ignores the extra `user` field, which says which adapter a record belongs to).

Held-out records never share their source item with training records: a different dev file (e2e, scitldr), a
different contract (legal), or a different dialogue, PMID or Alpaca record (dialogsum, medical, zh, drawn from one
file). No official test split is read: e2e, dialogsum and scitldr keep theirs out of `../shared/data/`, and the 500
official PubMedQA test PMIDs (`test_ground_truth.json`) are left out here. CUAD's `master_clauses.csv` marks no
split (all 510 contracts; the release's train/test split is in its QA JSON, which is not here).

Size: a record should stay under ~300 tokens. English inputs are capped at `INPUT_CHARS` (1,200) characters and
outputs at `OUTPUT_CHARS` (400). A record whose output is longer is skipped, never cut, so every target is a whole
text; so is one whose input is longer, since a summary or answer of text the model does not see teaches it to make
things up. The one exception is medical: the question comes first and the abstract is cut at a word boundary
(ending " …"), since the answer's conclusion is not in the abstract anyway and most abstracts are longer than the
cap. SmolLM2's tokenizer spends ~1.7 tokens per Chinese character, so a zh record (instruction, input and output
together) is kept only when it has at most `ZH_CHARS` (180) characters. Measured with SmolLM2's chat template, in
tokens (mean / max): legal 87 / 238, medical 360 / 499, e2e 105 / 151, dialogsum 252 / 436, scitldr 236 / 316,
zh 156 / 355; medical is the one user over ~300 on average (its abstracts fill the input cap).

Every user draws from its own `random.Random(SEED)`, so adding or changing one user leaves the others' records as
they are; the files are the same on every machine.
"""
from __future__ import annotations

import argparse
import ast
import csv
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 0
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "data" / "users"
TRAIN_PER_USER = 160
HELDOUT_PER_USER = 40
INPUT_CHARS = 1_200
OUTPUT_CHARS = 400
ZH_CHARS = 180

Item = tuple[str, dict[str, str]]
"""(source item id, record without "user"): records with the same id are never split between train and held out."""

LEGAL_QUESTIONS = {  # CUAD category -> (its answer column, the instruction); answers must be readable in the clause
    "Governing Law": (
        "Governing Law-Answer", "Which jurisdiction's law governs this contract? Answer with the place only."
    ),
    "Agreement Date": ("Agreement Date-Answer", "On what date was this agreement made? Answer as M/D/YY."),
    "Renewal Term": ("Renewal Term-Answer", 'How long is the renewal term? Answer briefly, e.g. "successive 1 year".'),
    "Notice Period To Terminate Renewal": (
        "Notice Period To Terminate Renewal- Answer",  # sic: CUAD's column name has this space
        'How much notice must a party give to stop the contract renewing? Answer briefly, e.g. "90 days".',
    ),
}  # fmt: skip


def legal(shared: Path) -> tuple[list[Item], list[Item]]:
    csv.field_size_limit(sys.maxsize)  # some clause cells are longer than csv's default 128 KiB limit
    with (shared / "legal_cuad/master_clauses.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    items = []
    for row in rows:
        for category, (answer_column, instruction) in LEGAL_QUESTIONS.items():
            spans = ast.literal_eval(row[category])  # a Python-list-like string of the clause's spans
            answer = _clean(row[answer_column])
            if not spans:
                continue
            if category == "Agreement Date" and not re.fullmatch(r"\d{1,2}/\d{1,2}/\d{2}", answer):
                continue  # CUAD writes unknown parts as "[]" ("[]/[]/2020"): not an answer to learn
            clause = "\n".join(_clean(s) for s in spans)
            items.append((row["Filename"], {"instruction": instruction, "input": clause, "output": answer}))
    return _split_by_item(items, random.Random(SEED))


def medical(shared: Path) -> tuple[list[Item], list[Item]]:
    records = json.loads((shared / "pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    test = json.loads((shared / "pubmedqa/test_ground_truth.json").read_text(encoding="utf-8"))
    instruction = (
        "Answer the biomedical research question from the abstract: yes, no or maybe, then the conclusion that "
        "supports it."
    )
    items = []
    for pmid, r in records.items():
        if pmid in test:  # the official test PMIDs
            continue
        text = f"Question: {_clean(r['QUESTION'])}\n\nAbstract: {_clean(' '.join(r['CONTEXTS']))}"
        answer = f"{r['final_decision'].capitalize()}. {_clean(r['LONG_ANSWER'])}"
        items.append((pmid, {"instruction": instruction, "input": _cut(text, INPUT_CHARS), "output": answer}))
    return _split_by_item(items, random.Random(SEED))


def e2e(shared: Path) -> tuple[list[Item], list[Item]]:
    instruction = "Describe the restaurant in one or two sentences from its attributes."

    def first_ref_per_mr(name: str) -> list[Item]:
        with (shared / "e2e" / name).open(encoding="utf-8", newline="") as f:
            refs: dict[str, str] = {}
            for row in csv.DictReader(f):
                refs.setdefault(row["mr"], _clean(row["ref"]))  # several rows share an MR: one record per MR
        return [(mr, {"instruction": instruction, "input": mr, "output": ref}) for mr, ref in refs.items()]

    return first_ref_per_mr("trainset.csv"), first_ref_per_mr("devset.csv")  # the two share no MR


def dialogsum(shared: Path) -> tuple[list[Item], list[Item]]:
    instruction = "Summarize the dialogue in a few sentences."
    items = []
    for r in _jsonl(shared / "dialogsum/dialogsum.dev.jsonl"):  # the only split here (no train, test held out)
        dialogue = "\n".join(_clean(turn) for turn in r["dialogue"].split("\n") if turn.strip())
        items.append((r["fname"], {"instruction": instruction, "input": dialogue, "output": _clean(r["summary"])}))
    return _split_by_item(items, random.Random(SEED))


def scitldr(shared: Path) -> tuple[list[Item], list[Item]]:
    instruction = "Write a one-sentence TL;DR of this paper abstract."

    def items(name: str) -> list[Item]:
        return [
            (r["paper_id"], {"instruction": instruction, "input": _clean(" ".join(r["source"])),
                             "output": _clean(r["target"][0])})  # target[0]: the author's TL;DR where there is one
            for r in _jsonl(shared / "scitldr" / name) if r["target"]
        ]  # fmt: skip

    return items("train.jsonl"), items("dev.jsonl")


def zh(shared: Path) -> tuple[list[Item], list[Item]]:
    items = []
    for part in range(10):
        path = shared / f"alpaca_zh_en/alpaca_chinese_part_{part}.json"
        for i, r in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            record = {k: r[k].strip() for k in ("instruction", "input", "output")}
            if sum(map(len, record.values())) <= ZH_CHARS:  # ~1.7 SmolLM2 tokens a character: ~300 tokens
                items.append((f"{part}:{i}", record))
    return _split_by_item(items, random.Random(SEED))


USERS: dict[str, Callable[[Path], tuple[list[Item], list[Item]]]] = {
    "legal": legal, "medical": medical, "e2e": e2e, "dialogsum": dialogsum, "scitldr": scitldr, "zh": zh,
}  # fmt: skip
"""User name -> the function giving its (train, held-out) candidate items, read from the shared data folder."""


def _split_by_item(items: list[Item], rng: random.Random) -> tuple[list[Item], list[Item]]:
    """Split one source into (train, held-out) candidates by item id: ids in seeded order go to held out until it
    has HELDOUT_PER_USER usable records, every record of an id on the same side."""
    usable = [item for item in items if _fits(item[1])]
    ids = list(dict.fromkeys(i for i, _ in usable))
    rng.shuffle(ids)
    heldout_ids: set[str] = set()
    count = {i: 0 for i in ids}
    for i, _ in usable:
        count[i] += 1
    n_heldout = 0
    for i in ids:
        if n_heldout >= HELDOUT_PER_USER:
            break
        heldout_ids.add(i)
        n_heldout += count[i]
    return [it for it in items if it[0] not in heldout_ids], [it for it in items if it[0] in heldout_ids]


def _fits(record: dict[str, str]) -> bool:
    """Whether a record is kept: non-empty output, input and output within their caps (medical inputs are cut
    before they get here, zh records were checked against ZH_CHARS already)."""
    return bool(record["output"]) and len(record["input"]) <= INPUT_CHARS and len(record["output"]) <= OUTPUT_CHARS


def draw(user: str, train: list[Item], heldout: list[Item]) -> tuple[list[dict], list[dict]]:
    """TRAIN_PER_USER and HELDOUT_PER_USER records of `user`, seeded, each list in source order."""
    rng = random.Random(SEED)
    picked = []
    for pool, k, side in ((train, TRAIN_PER_USER, "train"), (heldout, HELDOUT_PER_USER, "held-out")):
        usable = [record for _, record in pool if _fits(record)]
        if len(usable) < k:
            raise SystemExit(f"{user}: only {len(usable)} usable {side} records, {k} needed; lower the count")
        picked.append([{"user": user, **usable[i]} for i in sorted(rng.sample(range(len(usable)), k))])
    return picked[0], picked[1]


def prepare(shared: Path = SHARED, out: Path = OUT) -> dict[str, tuple[int, int]]:
    """Write `train.jsonl` and `heldout/<user>.jsonl` under `out`; return {user: (n_train, n_heldout)}."""
    train_all: list[dict] = []
    counts = {}
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    for user, make in USERS.items():
        train, heldout = draw(user, *make(shared))
        train_all += train
        counts[user] = (len(train), len(heldout))
        _write_jsonl(out / "heldout" / f"{user}.jsonl", heldout)
    random.Random(SEED).shuffle(train_all)
    _write_jsonl(out / "train.jsonl", train_all)
    return counts


def _clean(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else cut at the last space before it and ended with " …"."""
    if len(text) <= limit:
        return text
    return text[: limit - 2].rsplit(" ", 1)[0] + " …"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help=f"the shared data folder (default {SHARED})")
    parser.add_argument("--output", type=Path, default=OUT, help=f"where to write (default {OUT})")
    args = parser.parse_args()
    counts = prepare(args.shared, args.output)
    print(f"{'user':<10} {'train':>5} {'heldout':>7}")
    for user, (n_train, n_heldout) in counts.items():
        print(f"{user:<10} {n_train:>5} {n_heldout:>7}")
    print(f"{'all':<10} {sum(c[0] for c in counts.values()):>5} {sum(c[1] for c in counts.values()):>7}")
    print(f"wrote {args.output / 'train.jsonl'} and {args.output / 'heldout'}/<user>.jsonl")


if __name__ == "__main__":
    main()
