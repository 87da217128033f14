"""Write the derived data files some example configs read, under `runs/data/` (git-ignored), from `../shared/data/`.

    python examples/prepare_data.py      # from anywhere; stdlib only, about a second, same bytes on every run

What it writes, and why the configs cannot read `../shared/data/` directly for these:

- `pubmedqa/train.json`, `pubmedqa/dev.json` (pubmedqa.yaml): `ori_pqal.json` also holds the 500 official test
  PMIDs (`test_ground_truth.json`). These files hold the other 500, split 450 / 50 (seeded), in the same format.
- `legal_cuad/train/`, `legal_cuad/heldout/` (legal_cuad.yaml): the text reader takes one folder (every `.txt` in
  it) and no file list, so holding whole contracts out needs two folders: contracts in seeded order go to
  `heldout/` until it holds ~100 KB (3 contracts), the other 98 to `train/` (copies, ~6 MB).
- `e2e/dev200.csv`, `conll2003/dev200.conll`, `cmrc2018/dev24.json`: seeded samples of the dev sets, in their own
  format. Validation has no sample-size option, and evaluating a whole dev set a few times would cost more than
  the training: one evaluation of it takes ~6 min (e2e, 4,672 rows), ~5 min (CoNLL, 3,250) or ~50 min (CMRC,
  3,219) on an idle 2-core CPU, against 15-20 s for a sample. For a whole dev set pass `--val-data ../shared/...`.

Every sample is drawn with `random.Random(SEED)` and kept in file order, so the files are the same on every machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

SEED = 0
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "data"
PUBMEDQA_DEV = 50
CUAD_HELDOUT_BYTES = 100_000
DEV_SAMPLES = {"e2e": 200, "conll2003": 200, "cmrc2018": 24}

OUTPUTS = (
    "pubmedqa/train.json",
    "pubmedqa/dev.json",
    "legal_cuad/train",
    "legal_cuad/heldout",
    "e2e/dev200.csv",
    "conll2003/dev200.conll",
    "cmrc2018/dev24.json",
)
"""What `prepare` writes, relative to its `out` folder."""


def _sample(n_items: int, k: int) -> list[int]:
    """k indices of range(n_items), seeded, in ascending (file) order."""
    return sorted(random.Random(SEED).sample(range(n_items), k))


def pubmedqa(shared: Path, out: Path) -> None:
    records = json.loads((shared / "pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    test = json.loads((shared / "pubmedqa/test_ground_truth.json").read_text(encoding="utf-8"))
    pmids = [pmid for pmid in records if pmid not in test]  # the 500 PQA-L records outside the official test set
    dev = {pmids[i] for i in _sample(len(pmids), PUBMEDQA_DEV)}
    for name, keep in (("train", lambda p: p not in dev), ("dev", lambda p: p in dev)):
        subset = {pmid: records[pmid] for pmid in pmids if keep(pmid)}
        _write(out / f"pubmedqa/{name}.json", json.dumps(subset, ensure_ascii=False, indent=1))


def legal_cuad(shared: Path, out: Path) -> None:
    contracts = sorted((shared / "legal_cuad/full_contract_txt").glob("*.txt"))
    order = list(contracts)
    random.Random(SEED).shuffle(order)
    heldout: set[Path] = set()
    size = 0
    for path in order:  # whole contracts, in seeded order, until about CUAD_HELDOUT_BYTES are held out
        if size >= CUAD_HELDOUT_BYTES:
            break
        heldout.add(path)
        size += path.stat().st_size
    for name in ("train", "heldout"):
        shutil.rmtree(out / "legal_cuad" / name, ignore_errors=True)
        (out / "legal_cuad" / name).mkdir(parents=True)
    for path in contracts:
        shutil.copyfile(path, out / "legal_cuad" / ("heldout" if path in heldout else "train") / path.name)


def e2e_dev(shared: Path, out: Path) -> None:
    with (shared / "e2e/devset.csv").open(encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    path = out / f"e2e/dev{DEV_SAMPLES['e2e']}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header] + [rows[i] for i in _sample(len(rows), DEV_SAMPLES["e2e"])])


def conll_dev(shared: Path, out: Path) -> None:
    text = (shared / "conll2003/eng.testa").read_text(encoding="utf-8")
    blocks = [b.strip("\n") for b in text.split("\n\n") if b.strip()]
    sentences = [b for b in blocks if not b.startswith("-DOCSTART-")]  # the sentences, each as its own lines
    picked = [sentences[i] for i in _sample(len(sentences), DEV_SAMPLES["conll2003"])]
    _write(out / f"conll2003/dev{DEV_SAMPLES['conll2003']}.conll", "\n\n".join(picked) + "\n")


def cmrc_dev(shared: Path, out: Path) -> None:
    squad = json.loads((shared / "cmrc2018/cmrc2018_dev.json").read_text(encoding="utf-8"))
    questions = [(a, p, q) for a, article in enumerate(squad["data"])
                 for p, paragraph in enumerate(article["paragraphs"]) for q in range(len(paragraph["qas"]))]
    picked = [questions[i] for i in _sample(len(questions), DEV_SAMPLES["cmrc2018"])]
    data: list[dict] = []
    for a, p, q in picked:  # rebuild the SQuAD nesting around the picked questions only
        article = squad["data"][a]
        paragraph = article["paragraphs"][p]
        if not data or data[-1]["id"] != article["id"]:
            data.append({**article, "paragraphs": []})
        paragraphs = data[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["id"] != paragraph["id"]:
            paragraphs.append({**paragraph, "qas": []})
        paragraphs[-1]["qas"].append(paragraph["qas"][q])
    subset = {"version": squad.get("version", ""), "data": data}
    _write(out / f"cmrc2018/dev{DEV_SAMPLES['cmrc2018']}.json", json.dumps(subset, ensure_ascii=False, indent=1))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def prepare(shared: Path = SHARED, out: Path = OUT) -> list[Path]:
    """Write every file in `OUTPUTS` under `out`, read from `shared`; return their paths."""
    for make in (pubmedqa, legal_cuad, e2e_dev, conll_dev, cmrc_dev):
        make(shared, out)
    return [out / name for name in OUTPUTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help=f"the shared data folder (default {SHARED})")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    args = parser.parse_args()
    for path in prepare(args.shared, args.out):
        print(path)


if __name__ == "__main__":
    main()
