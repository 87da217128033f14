"""GGUF export, measured in llama.cpp: export time, file size, agreement with loraforge per type, and llama.cpp's
decode speed with the adapter against without it, beside loraforge's own, in one run.

    python bench/gguf_export.py               # the recorded run (bench/RESULTS.md, "GGUF export")
    python bench/gguf_export.py --steps 5     # a quick look

An adapter is trained with the demo's settings (all linear layers, r=16) for `--steps`, then exported as an adapter
GGUF (f32, f16, q8_0) and as merged files (f16, q8_0, q5_1, q4_1). Each file is run by llama.cpp (llama-cpp-python,
2 threads) on the default model's own GGUF, teacher-forced on 20 E2E texts: top-1 agreement with loraforge's
unquantized adapter and the mean |logit| error; greedy 8-token continuations of the 20 prompts. Decode speed: 64 new
tokens for one prompt, best of 3, llama.cpp with and without the adapter, and loraforge's engine (fp32, one row).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()

    import test_llama_cpp as lc

    from loraforge.data import encode_prompt
    from loraforge.demo import demo_config, sample_path
    from loraforge.export.gguf import export_adapter, export_merged
    from loraforge.infer import InferenceSession, SamplingParams, generate_many
    from loraforge.models import DEFAULT_MODEL, gguf_file_of
    from loraforge.train import train

    root = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    result = train(demo_config(a.steps, root / "adapter"), progress=False)
    session = InferenceSession(result.lora.unload(), result.tokenizer, base=DEFAULT_MODEL)
    session.add_adapter("tuned", root / "adapter")
    tokenizer, base = session.tokenizer, gguf_file_of(DEFAULT_MODEL)
    records = [json.loads(line) for line in sample_path("e2e_demo.jsonl").read_text().splitlines()[:20]]
    prompts = [encode_prompt(r["instruction"], r["input"], tokenizer) for r in records]
    texts = [q + tokenizer(" " + r["output"], add_special_tokens=False).input_ids for q, r in zip(prompts, records)]
    ours_logits = [lc._ours_logits(session, "tuned", ids) for ids in texts]
    ours_greedy = [lc._ours_greedy(session, "tuned", ids, 8) for ids in prompts]

    rows = []
    files = [("adapter", q, lambda q=q: export_adapter(root / "adapter", root / f"adapter-{q}.gguf", dtype=q))
             for q in ("f32", "f16", "q8_0")]
    files += [("merged", q, lambda q=q: export_merged(root / "adapter", base, root / f"merged-{q}.gguf", quant=q))
              for q in ("f16", "q8_0", "q5_1", "q4_1")]
    for kind, quant, export in files:
        start = time.perf_counter()
        out = export()
        seconds = time.perf_counter() - start
        llm = lc._llama(base, out.path) if kind == "adapter" else lc._llama(out.path)
        agree = total = 0
        errors = []
        for ids, ours in zip(texts, ours_logits):
            theirs = lc._llama_logits(llm, ids)
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ids)
            errors.append(float(np.abs(ours - theirs).mean()))
        same = sum(lc._llama_greedy(llm, ids, 8) == g for ids, g in zip(prompts, ours_greedy))
        rows.append((kind, quant, seconds, out.path.stat().st_size, agree / total, float(np.mean(errors)), same,
                     out.retention))
        print(rows[-1], flush=True)
        del llm

    def best_of_3(run) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return 64 / min(times)

    prompt = prompts[0]
    speed = {}
    for name, lora in (("llama.cpp, base GGUF", None), ("llama.cpp, base GGUF + adapter (f16)", root / "adapter-f16.gguf")):
        llm = lc._llama(base, lora)
        speed[name] = best_of_3(lambda llm=llm: lc._llama_greedy(llm, prompt, 64))
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)  # 64 tokens, as llama.cpp's loop makes
    for name, adapter in (("loraforge engine, base (fp32)", None), ("loraforge engine, adapter (fp32)", "tuned")):
        speed[name] = best_of_3(lambda adapter=adapter: generate_many(session, [prompt], params, [adapter]))

    print(f"\n# {time.strftime('%Y-%m-%d %H:%M')} {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, llama-cpp-python {__import__('llama_cpp').__version__}; adapter: {a.steps} steps")
    print("\n| file | type | export (s) | size (MB) | top-1 agreement | mean abs logit error | greedy 8 equal (of 20) "
          "| update kept (cosine) |\n|---|---|---|---|---|---|---|---|")
    for kind, quant, seconds, size, share, err, same, kept in rows:
        print(f"| {kind} | {quant} | {seconds:.1f} | {size / 1e6:.1f} | {100 * share:.1f}% | {err:.3f} | {same} | "
              f"{'-' if kept is None else f'{kept:.3f}'} |")
    print("\n| decoder | tokens/s (64 new, 1 prompt, best of 3) |\n|---|---|")
    for name, tps in speed.items():
        print(f"| {name} | {tps:.1f} |")


if __name__ == "__main__":
    main()
