"""Where one training step's memory and time go: activations saved for backward by module, and a profiler table.

    python bench/profile_step.py                          # default model, bf16, 8 packed rows of 256, q_proj+v_proj
    python bench/profile_step.py --targets all-linear --time

Saved activations are what autograd keeps between forward and backward; with a frozen bf16 base they are most of a
LoRA step's peak memory. Each tensor saved for backward is counted once (by storage) under the innermost module
running when it was saved; weights are not counted. Printed twice: with transformers' own forwards, and with the
training forwards `loraforge train` swaps in (loraforge.train.kernels).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import resource

import torch

from loraforge.config import parse_targets
from loraforge.data import load_examples, pad_id_for
from loraforge.data.packing import collate_packed, pack
from loraforge.lora import LoraConfig, LoraModel
from loraforge.models import DEFAULT_MODEL, load_model
from loraforge.train.kernels import packed_attention_on, packed_attention_supported, patched_for_training
from loraforge.train.loss import token_loss_sum


def tally_saved(model: torch.nn.Module, fn) -> tuple[dict[str, int], int]:
    """Run fn() under a saved-tensors hook. Bytes saved for backward, keyed by the innermost module running when the
    tensor was saved (its class) and the tensor's dtype; each storage counted once, parameters not counted."""
    by_key: dict[str, int] = collections.Counter()
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights (and views of them) excluded
    stack: list[str] = ["(outside modules)"]
    handles = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda mod, args: stack.append(type(mod).__name__)),
        m.register_forward_hook(lambda mod, args, out: stack.pop() and None))]

    def pack_hook(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            by_key[f"{stack[-1]} {str(t.dtype).removeprefix('torch.')}"] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
            fn()
    finally:
        for h in handles:
            h.remove()
    return dict(by_key), sum(by_key.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="src/loraforge/sample_data/e2e_demo.jsonl")
    p.add_argument("--recipe", default=None)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--time", action="store_true", help="also print a torch.profiler table of one step")
    a = p.parse_args()

    model, tokenizer = load_model(DEFAULT_MODEL, dtype=torch.bfloat16)
    lm = LoraModel(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=a.dropout,
                                     target_modules=parse_targets(a.targets)))
    model.train()
    examples, _ = load_examples(a.data, tokenizer, a.max_length, recipe=a.recipe)
    batch = collate_packed(pack(examples, a.max_length, seed=0)[:a.batch_size], pad_id_for(tokenizer))
    print(f"# {lm.report().trainable:,} trainable; batch {tuple(batch['input_ids'].shape)}; "
          f"RSS after load {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    for label, patch in (("transformers' forwards", contextlib.nullcontext(0)),
                         ("loraforge training forwards", patched_for_training(model))):
        with patch:
            loss = {}
            by_op, total = tally_saved(model, lambda: loss.setdefault("v", token_loss_sum(model, batch)[0]))
            loss["v"].backward()
        print(f"\n{label}: saved for backward {total / 2**20:.0f} MiB")
        for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {op:<40} {n / 2**20:8.1f} MiB  {100 * n / total:5.1f}%")
    print(f"peak RSS after two steps: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if a.time:
        from torch.profiler import ProfilerActivity, profile
        attention = packed_attention_on(model) if packed_attention_supported(model) else contextlib.nullcontext()
        with patched_for_training(model), attention, profile(activities=[ProfilerActivity.CPU]) as prof:
            token_loss_sum(model, batch)[0].backward()  # as `loraforge train` runs a packed step
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
