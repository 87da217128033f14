"""The engine's C++ kernels against another build of them, in one process: a change to `lora/csrc/` measured as A/B.

    git show HEAD~1:src/loraforge/lora/csrc/sgmv.cpp > /tmp/old_sgmv.cpp
    python bench/kernel_ab.py /tmp/old_sgmv.cpp            # the current sources against that sgmv.cpp

This VM's speed drifts by 10-20% within minutes (bench/RESULTS.md), more than most kernel changes gain, so two runs of
bench/multi_adapter.py cannot tell them apart. Here both builds serve one session (the default model, 8 adapters r=16
on every linear layer, 16 rows, greedy, 64 new tokens, as bench/multi_adapter.py), swapped between engine runs:
base only and mixed batch, each build once per round, the order reversed every round, the best and the median of
`--rounds` kept. Prints tokens/s, mixed / base for each build, and whether both builds decode the same tokens. A
build from before the lane kernel (no `linear_lanes_`, e.g. `git show 5130a23:src/loraforge/lora/csrc/sgmv.cpp`)
serves the mixed batch through its address-table kernel (`linear_t_`): the lane kernel measured against it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torch.utils import cpp_extension

sys.path.insert(0, str(Path(__file__).parent))
from multi_adapter import N_ADAPTERS, ROWS, make_adapters, ours, prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="an sgmv.cpp to build beside the current sources")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    from loraforge.infer import InferenceSession
    from loraforge.lora import multi, sgmv
    from loraforge.models import load_model

    csrc = Path(sgmv.__file__).parent / "csrc"
    build = Path(tempfile.mkdtemp(prefix="kernel_ab_"))
    builds = {"current": sgmv.kernel(), "other": cpp_extension.load(
        name="kernel_ab_other", sources=[str(args.other), str(csrc / "decode.cpp"), str(csrc / "quant.cpp")],
        build_directory=str(build), extra_cflags=sgmv.FLAGS, extra_ldflags=["-fopenmp"])}
    if builds["current"] is None:
        raise SystemExit("the current kernels could not be built (see the warning above)")
    base, tokenizer = load_model("smollm2-135m-instruct")
    folders = make_adapters(build, N_ADAPTERS, base)
    session = InferenceSession(base, tokenizer, base="smollm2-135m-instruct")
    for folder in folders:
        session.add_adapter(folder.name, folder)
    ids = prompts(tokenizer)
    systems = {"base": [None] * ROWS, "mixed": [f"user{i % N_ADAPTERS}" for i in range(ROWS)]}
    seconds: dict[tuple[str, str], list[float]] = {}
    lanes_min = multi.LANES_MIN
    outputs = {}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms up
            order = list(builds) if round_ % 2 else list(builds)[::-1]
            for name in order:
                sgmv._built["sgmv"] = builds[name]  # what sgmv.kernel() hands out
                # a build from before the lane kernel serves mixes through its address-table kernel
                multi.LANES_MIN = lanes_min if hasattr(builds[name], "linear_lanes_") else 10**9
                session.lora.routing.set(None)
                for system, adapters in systems.items():
                    start = time.perf_counter()
                    out = ours(session, ids, adapters, args.new_tokens if round_ else 4)
                    if round_:
                        seconds.setdefault((name, system), []).append(time.perf_counter() - start)
                        outputs[(name, system)] = out
    finally:
        sgmv._built["sgmv"] = builds["current"]
        multi.LANES_MIN = lanes_min
    tokens = ROWS * args.new_tokens
    print(f"| build | base tokens/s (best, median) | mixed tokens/s (best, median) | mixed / base (best) |")
    print("|---|---|---|---|")
    for name in builds:
        b, m = seconds[(name, "base")], seconds[(name, "mixed")]
        print(f"| {name} | {tokens / min(b):.1f}, {tokens / statistics.median(b):.1f} | {tokens / min(m):.1f}, "
              f"{tokens / statistics.median(m):.1f} | {min(b) / min(m):.3f} |")
    same = all(outputs[("current", s)] == outputs[("other", s)] for s in systems)
    print(f"\ncurrent / other, best: base {min(seconds[('other', 'base')]) / min(seconds[('current', 'base')]):.3f}x, "
          f"mixed {min(seconds[('other', 'mixed')]) / min(seconds[('current', 'mixed')]):.3f}x; "
          f"same tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
