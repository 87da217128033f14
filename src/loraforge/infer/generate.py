"""One prompt in, text out: a thin call over the engine (`infer.engine`), for the CLI and the demo."""
from __future__ import annotations

from loraforge.infer.engine import Engine, Request, SamplingParams, shared_prefix
from loraforge.infer.session import InferenceSession


def generate(session: InferenceSession, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
             adapter: str | None = None) -> tuple[list[int], str]:
    """Continue `prompt_ids` on `adapter` (None: the base); the new token ids and their text (special tokens out)."""
    ids = generate_many(session, [prompt_ids], params, [adapter])[0]
    return ids, session.tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_many(session: InferenceSession, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
                  adapters: list[str | None] | None = None, max_batch: int = 16) -> list[list[int]]:
    """Each prompt continued on its own adapter, all decoded together (mixed batches); new ids in the order given.
    A prefix all prompts share (`engine.shared_prefix`: a few-shot prompt's examples) runs once per adapter."""
    adapters = adapters if adapters is not None else [None] * len(prompts)
    requests = [Request(list(p), a, params) for p, a in zip(prompts, adapters)]
    prefix = prompts[0][:shared_prefix(prompts)] if prompts else []
    return [r.output_ids for r in Engine(session, max_batch=max_batch, prefix=prefix).run(requests)]
