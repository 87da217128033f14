"""Many adapters on one base: loraforge's engine against PEFT's `adapter_names=` and transformers' `generate`, in one run.

    python bench/multi_adapter.py                  # the recorded run (bench/RESULTS.md)
    python bench/multi_adapter.py --new-tokens 16  # a quick look

Setup, as the issue fixes it: the default model (SmolLM2-135M-Instruct, fp32), 8 adapters (r=16, alpha=32, every
linear layer, B drawn non-zero), 16 rows where row i uses adapter i mod 8, the prompts "Write a short note about topic
number i:", greedy, 64 new tokens for every row (EOS ignored on our side, `min_new_tokens` on theirs, so both
produce the same number of tokens). Each side is warmed up once, then timed over `--repeats` rounds in which every
system runs once (the best of each kept), so that a VM's drift falls on all of them alike; mixed / base is also
printed round by round (the two run back to back), with its median.

Rows printed:
1. decoding throughput (generated tokens/s): loraforge mixed batch, loraforge base only, loraforge with every row
   on one adapter (what reading one adapter instead of eight costs), PEFT `adapter_names`
   (its mixed-batch path), transformers `generate` on the plain base; the ratios the issue asks for; the share of
   the measured fp32 and bf16 matmul peaks that the mixed batch's FLOPs reach;
2. the decode kernels measured for the multi-adapter layer (the C++ lane kernel, the batch's adapters interleaved
   by lane and the base in one pass: the default for 5 or more adapters; the C++ kernel reading each adapter where
   it lives, in W's pass: the default for fewer; without a compiler, MKL's base and the stacked masked matmuls;
   per-adapter grouped matmuls and gather + bmm on the C++ base), each on the same mixed batch;
3. cold load: an r=16 all-linear adapter read from disk into the live model (`AdapterStore.ensure` after eviction),
   median and p90 over `--loads` loads;
4. 1,000 adapters registered in a store with a 64-resident cap, each used once in turn, in a child process: its
   peak RSS against the base alone + the cap (64 adapters' resident bytes) + 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N_ADAPTERS, ROWS, RANK = 8, 16, 16
DEFAULT_PROJECT_T = None  # multi.project_t, set while alternative kernels are measured


def make_adapters(root: Path, n: int, base, seed: int = 0) -> list[Path]:
    """`n` adapters in PEFT format: r=16 on every linear layer, A as LoRA's init, B ~ N(0, 0.02) (non-zero)."""
    from loraforge.lora import LoraConfig, LoraModel, save_adapter

    folders = []
    for k in range(n):
        torch.manual_seed(seed + k)
        lm = LoraModel(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear",
                                        base_model_name_or_path="smollm2-135m-instruct"))
        with torch.no_grad():
            for name, p in lm.adapter_parameters().items():
                if name.endswith("lora_B.weight"):
                    p.normal_(std=0.02)
        folders.append(save_adapter(lm, root / f"user{k}"))
        lm.unload()
    return folders


def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(f"Write a short note about topic number {i}:")["input_ids"] for i in range(ROWS)]


def best_of(repeats: int, fn) -> tuple[float, object]:
    """(seconds, result) of the fastest of `repeats` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, out = elapsed, result
    return best, out


def rounds(repeats: int, systems: dict, new: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """({name: seconds of each of its `repeats` runs}, {name: its output}), each round running every system once."""
    seconds, outputs = {name: [] for name in systems}, {}
    for _ in range(repeats):
        for name, run in systems.items():
            start = time.perf_counter()
            outputs[name] = run(new)
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


def ours(session, ids: list[list[int]], adapters: list[str | None], new: int) -> list[list[int]]:
    from loraforge.infer import Engine, Request, SamplingParams

    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    return [r.output_ids for r in Engine(session, max_batch=ROWS).run(
        [Request(p, a, params) for p, a in zip(ids, adapters)])]


def hf_generate(model, tokenizer, ids: list[list[int]], new: int, **kw) -> list[list[int]]:
    from loraforge.infer.batch import left_pad

    input_ids, mask = left_pad(ids, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id, **kw)
    return out[:, input_ids.shape[1]:].tolist()


def hf_model_linears(session) -> list:
    return [m for m in session.model.modules() if isinstance(m, torch.nn.Linear)]


def decode_flops(session, rows: int, adapters: bool) -> float:
    """Matmul FLOPs of one decode step of `rows` rows: 2 x rows x (base linear weights incl. the head [+ r x (in + out)
    per adapted layer, for each row's own adapter])."""
    weights = sum(m.weight.numel() for m in hf_model_linears(session))
    lora = sum(RANK * (layer.in_features + layer.out_features) for layer in session.lora.layers.values())
    return 2.0 * rows * (weights + (lora if adapters else 0))


# ---- alternative decode kernels, measured against the default (lora/multi.py) --------------------------------------
# The engine's decode step computes its layers through `multi.project_t` (activations transposed, xt (in, B)); each
# alternative replaces it by the base alone from the same kernel plus its own adapters' part for a mixed batch
# (the decode step's; prefills stay the default's).
def _mixed_only(lora_part):
    def project_t(layers, xt, with_lora=True, **kw):
        if kw.get("tokens_per_row", 1) != 1:  # a prefill: the default's
            return DEFAULT_PROJECT_T(layers, xt, with_lora, **kw)
        outs = DEFAULT_PROJECT_T(layers, xt, with_lora=with_lora and layers[0].routing.rows is None, **kw)
        if with_lora and layers[0].routing.rows is not None:
            outs = [y + lora_part(layer, xt) if layer.lora_a else y for layer, y in zip(layers, outs)]
        return outs
    return project_t


@_mixed_only
def grouped_decode(self, xt):
    """Per adapter present: its rows' columns, two matmuls, added back (a Python loop over adapters)."""
    delta = xt.new_zeros(self.out_features, xt.shape[1])
    for slot, rows in self.routing.groups:
        if slot in self.lora_a:
            h = self.lora_a[slot] @ xt[:, rows]  # (r, n)
            delta = delta.index_add(1, rows, self.lora_b[slot] @ h, alpha=self.lora_s[slot])
    return delta


@_mixed_only
def gather_decode(self, xt):
    """Each row's A and s·B gathered from a (slots, R, in) / (slots, out, R) stack, then two bmm's."""
    routing = self.routing
    key = (routing.version, self._state["version"])
    if getattr(self, "_gather_key", None) != key:
        r = max(a.shape[0] for a in self.lora_a.values())
        slots = max(self.lora_a) + 1
        a = torch.zeros(slots + 1, r, self.in_features)  # the last slot is all zeros: base rows
        b = torch.zeros(slots + 1, self.out_features, r)
        for s, t in self.lora_a.items():
            a[s, :t.shape[0]] = t
            b[s, :, :t.shape[0]] = self.lora_b[s] * self.lora_s[s]
        index = torch.where(routing.rows >= 0, routing.rows, slots)
        self._gather = (a[index], b[index])  # (B, R, in), (B, out, R)
        self._gather_key = key
    a, b = self._gather
    h = torch.bmm(a, xt.T.unsqueeze(2))  # (B, R, 1)
    return torch.bmm(b, h).squeeze(2).T  # (out, B)


# ---- the 1,000-adapter store, in its own process ------------------------------------------------------------------
def store_worker(args: argparse.Namespace) -> dict:
    from loraforge.infer import InferenceSession
    from loraforge.infer.store import AdapterStore
    from loraforge.train.observe import rss_mb
    from loraforge.train.runtime import release_free_memory

    session = InferenceSession.open("smollm2-135m-instruct")
    release_free_memory()
    base_rss = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM): loading the base peaks higher
    store = AdapterStore(args.store, session, max_resident=args.cap)
    names = store.names()
    start = time.perf_counter()
    peak = base_rss
    for i, name in enumerate(names):
        store.ensure([name])
        if i % 50 == 0:
            release_free_memory()
        peak = max(peak, rss_mb())
    seconds = time.perf_counter() - start
    cap_mb = sum(store.resident.values()) / 2**20
    status = Path("/proc/self/status").read_text()
    max_rss = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    return {"adapters": len(names), "resident": len(store.resident), "base_rss_mb": base_rss, "cap_mb": cap_mb,
            "peak_rss_mb": max(peak, max_rss), "seconds": seconds,
            "median_load_ms": 1e3 * statistics.median(store.load_seconds)}


def build_store(root: Path, folders: list[Path], n: int) -> Path:
    """`n` registered adapters: folders whose files are hard links to the 8 distinct adapters (no 20 GB of disk)."""
    store = root / "store1000"
    store.mkdir()
    for i in range(n):
        target = store / f"u{i:04d}"
        target.mkdir()
        for f in folders[i % len(folders)].iterdir():
            if f.name.startswith("adapter_"):
                os.link(f, target / f.name)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loads", type=int, default=40)
    parser.add_argument("--registered", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=64)
    parser.add_argument("--store", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.store:
        print(json.dumps(store_worker(args)))
        return

    import peft

    from loraforge.infer import InferenceSession
    from loraforge.infer.store import AdapterStore
    from loraforge.lora.adapter import read_adapter
    from loraforge.lora import multi
    from loraforge.models import load_model
    from loraforge.train.observe import measure_matmul_peak

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    tmp = Path(tempfile.mkdtemp(prefix="multi_adapter_"))
    base, tokenizer = load_model("smollm2-135m-instruct")
    folders = make_adapters(tmp, N_ADAPTERS, base)
    ids = prompts(tokenizer)
    names = [f"user{i % N_ADAPTERS}" for i in range(ROWS)]
    new = args.new_tokens
    tokens = ROWS * new

    session = InferenceSession(base, tokenizer, base="smollm2-135m-instruct")
    for folder in folders:
        session.add_adapter(folder.name, folder)
    hf_base, _ = load_model("smollm2-135m-instruct")
    peft_model = peft.PeftModel.from_pretrained(load_model("smollm2-135m-instruct")[0], str(folders[0]),
                                                adapter_name="user0")
    for folder in folders[1:]:
        peft_model.load_adapter(str(folder), adapter_name=folder.name)
    peft_model.eval()
    systems = {  # every system once per round, rounds repeated: a VM's drift falls on all of them alike
        "mixed": lambda n: ours(session, ids, names, n),
        "base": lambda n: ours(session, ids, [None] * ROWS, n),
        "one": lambda n: ours(session, ids, ["user0"] * ROWS, n),
        "hf": lambda n: hf_generate(hf_base, tokenizer, ids, n),
        "peft": lambda n: hf_generate(peft_model, tokenizer, ids, n, adapter_names=names),
    }
    for run in systems.values():
        run(4)  # warm-up
    seconds, outputs = rounds(args.repeats, systems, new)
    best = {name: min(times) for name, times in seconds.items()}
    per_round = sorted(b / m for b, m in zip(seconds["base"], seconds["mixed"]))  # back to back in each round
    t_mixed, t_base, t_one, t_hf, t_peft = (best[k] for k in ("mixed", "base", "one", "hf", "peft"))
    mixed_out, peft_out = outputs["mixed"], outputs["peft"]
    same_rows = sum(a == b for a, b in zip(mixed_out, peft_out))
    del peft_model, hf_base
    kernels = {"C++ lane kernel: the batch's adapters interleaved by lane, the base in the same pass (default)":
               (t_mixed, True)}
    lane_bytes = session.lora.lane_bytes()
    multi.LANES_MIN, lanes_min = 10**9, multi.LANES_MIN  # the kernel for mixes of fewer adapters
    session.lora.routing.set(None)
    try:
        t, out = best_of(args.repeats, lambda: ours(session, ids, names, new))
        kernels["C++: each adapter read where it lives, in W's pass (a mix of fewer than 5 adapters)"] = (
            t, out == mixed_out)
    finally:
        multi.LANES_MIN = lanes_min
        session.lora.routing.set(None)
    os.environ["LORAFORGE_KERNELS"] = "0"  # the fallback where the kernel cannot be built
    session.lora.routing.set(None)  # the layers rebuild their stacks for the next mix
    try:
        t, out = best_of(args.repeats, lambda: ours(session, ids, names, new))
        kernels["no C++ kernel: MKL's base, adapters stacked + row mask (the fallback)"] = (t, out == mixed_out)
    finally:
        os.environ.pop("LORAFORGE_KERNELS")
        session.lora.routing.set(None)
    global DEFAULT_PROJECT_T
    from loraforge.infer import decode

    DEFAULT_PROJECT_T = default = multi.project_t
    for label, project_t in (("grouped per adapter", grouped_decode), ("gather + bmm", gather_decode)):
        multi.project_t = decode.project_t = project_t
        try:
            t, out = best_of(args.repeats, lambda: ours(session, ids, names, new))
            kernels[label] = (t, out == mixed_out)
        finally:
            multi.project_t = decode.project_t = default

    fp32_peak, bf16_peak = measure_matmul_peak(torch.float32), measure_matmul_peak(torch.bfloat16)
    flops = decode_flops(session, ROWS, True) * new / t_mixed
    print(f"\n## decoding: {ROWS} rows, {N_ADAPTERS} adapters (r={RANK}, all-linear), {new} new tokens each, greedy, fp32")
    print("| system | tokens/s |")
    print("|---|---|")
    for label, t in (("loraforge mixed batch (16 rows, 8 adapters)", t_mixed), ("loraforge base only", t_base),
                     ("loraforge, all 16 rows on one adapter", t_one),
                     ("PEFT adapter_names (16 rows, 8 adapters)", t_peft), ("transformers generate, base", t_hf)):
        print(f"| {label} | {tokens / t:.1f} |")
    print(f"\nmixed vs PEFT adapter_names: {t_peft / t_mixed:.2f}x (goal >= 4x)")
    print(f"mixed vs our base only: {t_base / t_mixed:.3f}x (goal >= 0.85x); round by round "
          f"{', '.join(f'{r:.3f}' for r in per_round)} (median {statistics.median(per_round):.3f})")
    print(f"our base only vs transformers generate: {t_hf / t_base:.2f}x (goal >= 1.5x)")
    print(f"greedy rows identical to PEFT's: {same_rows}/{ROWS}")
    extra = sum(t.numel() for f in folders for t in read_adapter(f).tensors.values())
    weights = sum(m.weight.numel() for m in hf_model_linears(session))
    print(f"bytes read per decode step: base linear weights {4 * weights / 2**20:.0f} MiB + 8 adapters "
          f"{4 * extra / 2**20:.0f} MiB (+{100 * extra / weights:.0f}%)")
    print(f"the lane kernel's copy of the batch's adapters: {lane_bytes / 2**20:.0f} MiB")
    print(f"mixed batch: {flops / 1e9:.1f} GFLOP/s = {100 * flops / fp32_peak:.1f}% of the measured fp32 matmul peak "
          f"({fp32_peak / 1e9:.0f} GFLOP/s); measured bf16 matmul peak {bf16_peak / 1e9:.1f} GFLOP/s"
          + (" (no native bf16 on this CPU: decoding runs in fp32)" if bf16_peak < fp32_peak else
             f", {100 * flops / bf16_peak:.1f}% of it"))
    print("\n## multi-adapter decode kernels (same mixed batch)")
    print("| kernel | tokens/s | vs base only | same tokens as the default |")
    print("|---|---|---|---|")
    for label, (t, same) in kernels.items():
        print(f"| {label} | {tokens / t:.1f} | {t_base / t:.3f}x | {'yes' if same else 'no'} |")

    store_root = tmp / "store"
    store_root.mkdir()
    for folder in folders:
        os.link(folder / "adapter_model.safetensors", store_root / "tmp.safetensors")
        (store_root / folder.name).mkdir()
        os.replace(store_root / "tmp.safetensors", store_root / folder.name / "adapter_model.safetensors")
        os.link(folder / "adapter_config.json", store_root / folder.name / "adapter_config.json")
    cold = AdapterStore(store_root, InferenceSession.open("smollm2-135m-instruct"), max_resident=1)
    cold.ensure(["user0"])
    cold.load_seconds.clear()
    for i in range(args.loads):
        cold.ensure([f"user{(i + 1) % N_ADAPTERS}"])  # never resident: the cap of 1 evicted it
    ms = sorted(1e3 * s for s in cold.load_seconds)
    size = os.path.getsize(folders[0] / "adapter_model.safetensors") / 2**20
    print(f"\n## cold load: r={RANK} all-linear adapter ({size:.1f} MiB file) from disk into the live model")
    print(f"median {statistics.median(ms):.1f} ms, p90 {ms[int(0.9 * len(ms))]:.1f} ms over {len(ms)} loads "
          "(goal: median <= 20 ms)")

    store = build_store(tmp, folders, args.registered)
    child = subprocess.run([sys.executable, __file__, "--store", str(store), "--cap", str(args.cap)],
                           capture_output=True, text=True, check=True)
    r = json.loads(child.stdout.strip().splitlines()[-1])
    bound = r["base_rss_mb"] + 1.1 * r["cap_mb"]
    print(f"\n## {r['adapters']} adapters registered, cap {args.cap} resident, each used once in turn")
    print(f"base alone {r['base_rss_mb']:.0f} MB, cap {r['cap_mb']:.0f} MB ({r['resident']} resident), peak RSS "
          f"{r['peak_rss_mb']:.0f} MB; bound base + cap + 10% = {bound:.0f} MB: "
          f"{'within' if r['peak_rss_mb'] <= bound else 'OVER'}; {r['seconds']:.1f} s for all, median load "
          f"{r['median_load_ms']:.1f} ms")


if __name__ == "__main__":
    main()
