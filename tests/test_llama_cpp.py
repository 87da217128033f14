"""llama.cpp itself runs loraforge's GGUF exports (llama-cpp-python, built from source by the dev extras).

An adapter trained on the default model (the demo's settings in fp32, a few steps) is exported and loaded by llama.cpp
on the default model's own GGUF, and the merged Q8_0 export alone. Against loraforge on the same base and token ids:
teacher-forced top-1 agreement on 20 texts >= 95% of positions (measured 96.7%, merged 97.8%); greedy continuations
equal on their first 8 tokens for at least 18 of 20 prompts (measured 19; the one that parts, at a near-tie); and the
adapter moves llama.cpp's output the way training moved loraforge's. llama.cpp multiplies Q4_1 weights by
8-bit-quantized activations, so bit-equality is not the bar; the logit error is printed.
"""
from __future__ import annotations

import dataclasses
import json

import llama_cpp  # a missing build fails here, loudly: the dev extras build it
import numpy as np
import pytest
import torch

from loraforge.data import encode_prompt
from loraforge.demo import demo_config, sample_path
from loraforge.export.gguf import export_adapter, export_merged
from loraforge.infer import InferenceSession
from loraforge.models import DEFAULT_MODEL, gguf_file_of
from loraforge.train import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cpp")
    # trained in fp32 whatever the CPU (the demo's dtype is auto: bf16 where the CPU has it), so every machine checks
    # the same adapter
    train(dataclasses.replace(demo_config(12, root / "adapter"), dtype="float32"), progress=False)
    # loraforge's side in fp32 on the fp32 base: its exact output (the demo's dtype is auto, bf16 on a CPU with
    # AVX512-BF16, where bf16 logits tie exactly and a reference made of ties decides nothing)
    session = InferenceSession.open(DEFAULT_MODEL, {"tuned": root / "adapter"}, dtype="float32")
    base = gguf_file_of(DEFAULT_MODEL)
    adapter = export_adapter(root / "adapter", root / "adapter.gguf", dtype="f32").path
    merged = export_merged(root / "adapter", base, root / "merged-q8_0.gguf", quant="q8_0").path
    records = [json.loads(line) for line in sample_path("e2e_demo.jsonl").read_text().splitlines()[:20]]
    prompts = [encode_prompt(r["instruction"], r["input"], session.tokenizer) for r in records]
    texts = [p + session.tokenizer(" " + r["output"], add_special_tokens=False).input_ids
             for p, r in zip(prompts, records)]
    return session, base, adapter, merged, prompts, texts


def _llama(model, lora=None) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512, n_batch=512,
                           logits_all=True, verbose=False, n_threads=2, seed=0)


def _llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])  # (T, V)


def _llama_greedy(llm: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _ours_logits(session, name, ids: list[int]) -> np.ndarray:
    with session.use(name) as model, torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _ours_greedy(session, name, ids: list[int], n: int) -> list[int]:
    out = []
    with session.use(name) as model, torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(token)
    return out


def _agreement(session, name, llm, texts) -> tuple[float, float]:
    agree = total = 0
    worst = 0.0
    for ids in texts:
        ours, theirs = _ours_logits(session, name, ids), _llama_logits(llm, ids)
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(ours - theirs).max()))
    return agree / total, worst


def test_adapter_in_llama_cpp_agrees_with_loraforge(exported):
    session, base, adapter, _, prompts, texts = exported
    llm = _llama(base, adapter)
    share, worst = _agreement(session, "tuned", llm, texts)
    print(f"adapter GGUF in llama.cpp: top-1 agreement {share:.4f}, max |logit difference| {worst:.3f}")
    assert share >= 0.95
    same, near_ties = 0, []
    for ids in prompts:
        ours, theirs = _ours_greedy(session, "tuned", ids, 8), _llama_greedy(llm, ids, 8)
        if ours == theirs:
            same += 1
            continue
        k = next(i for i in range(8) if ours[i] != theirs[i])  # where they part: how close was our choice?
        top2 = np.sort(_ours_logits(session, "tuned", ids + ours[:k])[-1])[-2:]
        near_ties.append(float(top2[1] - top2[0]))
    print(f"greedy, first 8 tokens equal for {same} of 20 prompts; the others part at top-2 margins {near_ties}")
    # The bar, on this adapter (trained in fp32: the same adapter on every CPU but for its last bits): 19 of
    # 20 on two VMs (12-01, 12-02), with llama.cpp's KV cache in f16 or f32 and on 1 or 2 threads. Of the 19, the two
    # closest calls had top-2 margins of 0.02-0.04 logits on both sides, orders above what last bits move, so the
    # count does not hang on the machine. Over other adapters it is 16-19 (about 90% of prompts,
    # bench/gguf_greedy.py and bench/RESULTS.md): where they part, always at a near-tie (< 0.25 logits, under
    # llama.cpp's mean logit error ~0.2) that its 8-bit activations on the Q4_1 weights tip, which is checked too.
    assert same >= 18 and all(margin < 0.25 for margin in near_ties)


def test_merged_q8_0_in_llama_cpp_agrees_with_loraforge(exported):
    session, _, _, merged, _, texts = exported
    share, worst = _agreement(session, "tuned", _llama(merged), texts)
    print(f"merged Q8_0 GGUF in llama.cpp: top-1 agreement {share:.4f}, max |logit difference| {worst:.3f}")
    assert share >= 0.95


def test_the_adapter_moves_llama_cpp_as_training_moved_loraforge(exported):
    """Without the adapter llama.cpp answers as the base does; with it, as the tuned model does (the E2E style):
    for each prompt, llama.cpp's answer shares a longer start with loraforge's answer of the same kind (base or
    tuned) than with the other one."""
    session, base, adapter, _, prompts, _ = exported
    plain, tuned = _llama(base), _llama(base, adapter)

    def shared(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    moved = 0
    for ids in prompts[:10]:
        ours_base, ours_tuned = _ours_greedy(session, None, ids, 16), _ours_greedy(session, "tuned", ids, 16)
        assert shared(ours_base, ours_tuned) < 16  # training changed loraforge's answer
        theirs_base, theirs_tuned = _llama_greedy(plain, ids, 16), _llama_greedy(tuned, ids, 16)
        moved += shared(theirs_tuned, ours_tuned) > shared(theirs_tuned, ours_base) and \
            shared(theirs_base, ours_base) > shared(theirs_base, ours_tuned)
    print("llama.cpp with the adapter:", session.tokenizer.decode(_llama_greedy(tuned, prompts[0], 24)))
    assert moved >= 9
