"""The engine's C++ kernels, compiled on first use for this machine's CPU: the served layers' matmul for a few rows,
each on its own adapter (csrc/sgmv.cpp, `linear_t_`, and `linear_lanes_` for a mix of many adapters), the decode
step's RMSNorm and rotary embedding in one pass each (csrc/decode.cpp, `rms_t`, `rotary_t`), and NF4 unpacking for a
packed base (csrc/quant.cpp, `nf4_unpack_`, used by quant/nf4.py).

`kernel()` returns the compiled module, or None where it cannot be built (no C++ compiler, or
`LORAFORGE_KERNELS=0`): `lora.multi` then falls back to torch's matmul and its stacked-and-masked adapters, which give
the same sums up to float rounding at G times the FLOPs (bench/RESULTS.md, "Many adapters on one base"), and
`infer.decode` to torch ops. The build is cached under `~/.cache/loraforge/kernels/` (`$LORAFORGE_HOME/kernels`, as
the model cache), keyed by the source, torch's version and the CPU's instruction set (it is compiled with
-march=native), so it costs ~30 s once per machine.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("sgmv.cpp", "decode.cpp", "quant.cpp")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_built: dict[str, object] = {}


def kernel():
    """The compiled kernels module, or None (compiled once per process, and once per machine on disk)."""
    if os.environ.get("LORAFORGE_KERNELS", "1") == "0":
        return None
    if "sgmv" in _built:  # the hot path: ~120 calls a decode step
        return _built["sgmv"]
    with _lock:
        if "sgmv" not in _built:
            _built["sgmv"] = _build()
        return _built["sgmv"]


def kernel_for(t: torch.Tensor):
    """The compiled module where it computes on `t`'s kind of tensor (fp32 on a CPU), else None."""
    return kernel() if t.dtype == torch.float32 and t.device.type == "cpu" else None


def _build():
    from torch.utils import cpp_extension

    source = "\n".join(path.read_text() for path in SOURCES)
    key = hashlib.sha256("\n".join([source, torch.__version__, platform.machine(), _cpu_flags(), *FLAGS])
                         .encode()).hexdigest()[:16]
    root = Path(os.environ.get("LORAFORGE_HOME") or "~/.cache/loraforge").expanduser() / "kernels"
    folder = root / f"sgmv_{key}"
    path = os.environ.get("PATH", "")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if shutil.which("ninja") is None:  # the `ninja` wheel, in a virtual environment that is not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        return cpp_extension.load(name=f"loraforge_sgmv_{key}", sources=[str(path) for path in SOURCES],
                                  build_directory=str(folder), extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                                  verbose=False)
    except Exception as e:  # no compiler, no Python headers, no ninja: the stacked kernel serves instead
        log.warning("mixed-adapter batches use the slower stacked kernel: the C++ kernel could not be built "
                    "(%s: %s)", type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None
    finally:
        os.environ["PATH"] = path


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), so a cached -march=native build never runs on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
