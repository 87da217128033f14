"""Combine LoRA adapters trained on one base into one new adapter, in PEFT's format (`loraforge combine`).

Every method works module by module on each adapter's factors A (r, in) and B (out, r) and its scaling s (lora_alpha
/ r, or / sqrt(r) with rsLoRA; rank_pattern and alpha_pattern included), in float64 on the CPU. Adapter i's update
of a module is its task vector

    delta_i = s_i · B_i A_i        (out, in); for an embedding (dim, num), as PEFT stores its A (r, num), B (dim, r)

and w_i is its weight. The output's scaling is 1 everywhere (lora_alpha = r at every module, no rsLoRA), so the
factors written are the update itself. A module that only some adapters target counts as a zero update in the
others: they add nothing to it (for `linear`, zero A and B; for ties, a zero entry votes for no sign).

| method | the update written for each module |
|---|---|
| cat | exactly sum_i w_i delta_i: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], rank sum_i r_i |
| linear | PEFT's: (sum_i sqrt(|w_i s_i|) B_i) (sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i), equal ranks only; NOT |
|        | the weighted sum of updates: the cross terms sqrt(|w_i s_i w_j s_j|) B_i A_j (i != j) are in it |
| svd | sum_i w_i delta_i, truncated by SVD to `rank` (default: the largest input rank); exact at full rank. The |
|     | SVD comes from the factors (QR of [w_i s_i B_i] and [A_i]ᵀ, then the small core), never the (out, in) matrix |
| magnitude_prune | sum_i w_i prune_k(delta_i), then SVD to `rank` |
| dare_linear | sum_i w_i dare(delta_i), then SVD to `rank` |
| ties | disjoint_merge(prune_k(delta_i)), then SVD to `rank` |
| dare_ties | disjoint_merge(dare(delta_i)), then SVD to `rank` |

prune_k keeps the int(density · numel) entries of largest |delta_i| and zeroes the rest; dare keeps each entry with
probability `density` (a `torch.Generator` seeded by `seed`, so a seed gives one result) and divides the kept ones by
`density`. disjoint_merge elects a sign per entry from the unweighted pruned updates (`total`: the sign of their
sum; `frequency`: the sign held by more of them; ties go to +), then averages w_i · delta_i over the adapters whose
entry has that sign (their count, not the weights, divides). These are the definitions of PEFT's `merge_utils`
(0.21.2), so ties/dare/magnitude_prune give PEFT's `*_svd` combination types; PEFT's plain `ties` etc. apply the same
functions to the A's and the B's separately, which has no such meaning and is not offered here.

The SVD split: for delta = U S Vᵀ, B = U_k sqrt(S_k) and A = sqrt(S_k) V_kᵀ (balanced factors; PEFT puts all of S in
B; the update is the same). A module whose update has fewer than `rank` singular values gets zero rows in A and
zero columns in B, so every module has rank `rank`. The relative Frobenius error ||delta - B A||_F / ||delta||_F of the
truncation (sqrt of the dropped singular values' share of the squared sum) is logged and returned per module.

Where PEFT 0.21.2 differs: its new adapter copies the first adapter's use_rslora with lora_alpha = r = R, so when that
adapter is rsLoRA every combination comes out sqrt(R) times too large (huggingface/peft#3449); it turns any single
adapter into `linear`; its DARE mask is unseeded; it offers svd_clamp, which is not offered here.

Refused, with the reason: DoRA adapters (the weight is m · (W + ΔW) / ||W + ΔW||, not linear in ΔW, so updates
do not add), trained biases and modules_to_save (classifier heads: full weights trained apart, for their own label
sets; averaging them gives a head for neither task), adapters made for different bases, ranks that `linear` cannot
mix. PEFT's embedding base weight (saved beside an embedding's factors) is carried over when every adapter that has
it has the same one.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import LoraforgeError
from loraforge.lora.adapter import AdapterWeights, read_adapter, umask_mode, write_adapter
from loraforge.lora.config import LoraConfig
from loraforge.lora.layer import lora_scaling
from loraforge.lora.model import PEFT_PREFIX

METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
_FACTOR_KEYS = {"linear": (".lora_A.weight", ".lora_B.weight"), "embedding": (".lora_embedding_A", ".lora_embedding_B")}
log = logging.getLogger("loraforge")


@dataclass(frozen=True)
class _Factors:
    """One module of one adapter, in float64."""

    kind: str  # "linear" (Linear, Conv1D) or "embedding": which key names it has
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.b @ self.a)  # (out, in)


@dataclass(frozen=True)
class _Parsed:
    source: str
    config: LoraConfig
    modules: dict[str, _Factors]
    base_weights: dict[str, torch.Tensor]  # PEFT's saved embedding base weights, by key


@dataclass(frozen=True)
class Combined:
    """The combined adapter (in memory: `save` writes it, an `InferenceSession` takes it as is) and, for the SVD
    methods, each module's relative Frobenius error ||delta - B A||_F / ||delta||_F of the rank truncation."""

    adapter: AdapterWeights
    method: str
    errors: dict[str, float]

    def save(self, directory: str | Path) -> Path:
        """Write adapter_config.json + adapter_model.safetensors into `directory`, a new or empty folder, built
        beside it and renamed in (never half an adapter)."""
        out = _check_output(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp.chmod(umask_mode(0o777))  # mkdtemp makes it private; the files are written by atomic_write
        try:
            write_adapter(tmp, {PEFT_PREFIX + k: v for k, v in self.adapter.tensors.items()}, self.adapter.config)
            out.rmdir() if out.exists() else None
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out


def combine_adapters(directories: Sequence[str | Path], output: str | Path, method: str,
                     weights: Sequence[float] | None = None, *, rank: int | None = None, density: float | None = None,
                     majority_sign: str = "total", seed: int = 0) -> Combined:
    """Read the adapters in `directories`, combine them (`combine`) and write the result to `output`."""
    out = _check_output(output)  # before the work, not after it
    combined = combine([read_adapter(d) for d in directories], method, weights, rank=rank, density=density,
                       majority_sign=majority_sign, seed=seed)
    combined.save(out)
    return combined


def combine(adapters: Sequence[AdapterWeights], method: str, weights: Sequence[float] | None = None, *,
            rank: int | None = None, density: float | None = None, majority_sign: str = "total",
            seed: int = 0) -> Combined:
    """One adapter from `adapters` (same base) by `method` (the module docstring has each one's math). `weights`:
    one per adapter (default 1 each); `rank`: the output rank of the SVD methods (default: the largest input rank);
    `density`: the share of each update kept by ties/dare/magnitude_prune; `seed`: DARE's drop mask."""
    weights = _check_arguments(adapters, method, weights, rank, density, majority_sign)
    parsed = [_parse(a) for a in adapters]
    _check_same_base(parsed)
    svd_rank = rank or max(f.a.shape[0] for p in parsed for f in p.modules.values())
    gen = torch.Generator().manual_seed(seed)
    dtype = _output_dtype(adapters)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    for path in sorted(set().union(*(p.modules for p in parsed))):
        parts = [(w, p.modules[path], p.source) for w, p in zip(weights, parsed) if path in p.modules]
        kind = _check_module(path, parts)
        if method == "cat":
            a, b = _cat([(w, f) for w, f, _ in parts])
        elif method == "linear":
            a, b = _linear(path, parts)
        else:
            if method == "svd":  # a sum of low-rank updates: its SVD from its factors, never the (out, in) matrix
                usv = _low_rank_svd(*_cat([(w, f) for w, f, _ in parts]))
            else:
                deltas = torch.stack([f.delta() for _, f, _ in parts])  # (n, out, in)
                w = torch.tensor([w for w, _, _ in parts], dtype=torch.float64)
                usv = torch.linalg.svd(_merge(method, deltas, w, density, majority_sign, gen), full_matrices=False)
            a, b, errors[path] = _truncate(*usv, svd_rank)
            log.info("%s rank %d: relative Frobenius error %.3g at %s", method, svd_rank, errors[path], path)
        key_a, key_b = _FACTOR_KEYS[kind]
        tensors[path + key_a], tensors[path + key_b] = a.to(dtype), b.to(dtype)
        ranks[path] = a.shape[0]
    for p in parsed:
        tensors.update(p.base_weights)
    config = _output_config(parsed, ranks)
    source = f"{method} of {', '.join(p.source for p in parsed)}"
    return Combined(AdapterWeights(source, config, tensors), method, errors)


# ---- checks ---------------------------------------------------------------------------------------------------
def _check_output(directory: str | Path) -> Path:
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraforgeError(f"--output {out} exists and is not an empty folder; give a new folder or remove it")
    return out


def _check_arguments(adapters: Sequence[AdapterWeights], method: str, weights: Sequence[float] | None,
                     rank: int | None, density: float | None, majority_sign: str) -> list[float]:
    if method not in METHODS:
        raise LoraforgeError(f"unknown combination method {method!r}; choose one of {', '.join(METHODS)}")
    if not adapters:
        raise LoraforgeError("nothing to combine: give at least one --adapter")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise LoraforgeError(f"--weights has {len(weights)} value(s) for {len(adapters)} adapter(s); give one weight "
                             "per --adapter, in the same order")
    if not all(math.isfinite(w) for w in weights):
        raise LoraforgeError(f"--weights must be finite numbers, got {weights}")
    if method in PRUNING:
        if density is None:
            raise LoraforgeError(f"--method {method} needs --density: the share of each update it keeps, in (0, 1]")
        if not 0.0 < density <= 1.0:
            raise LoraforgeError(f"--density must be in (0, 1] (the share of each update kept), got {density}")
    elif density is not None:
        raise LoraforgeError(f"--density applies to {', '.join(PRUNING)}; {method} does not prune")
    if rank is not None:
        if method in ("cat", "linear"):
            raise LoraforgeError(f"--rank applies to the SVD methods; {method}'s rank is fixed (cat: the sum of the "
                                 "input ranks, linear: their common rank). Use --method svd to choose a rank")
        if rank < 1:
            raise LoraforgeError(f"--rank must be at least 1, got {rank}")
    if majority_sign not in SIGN_METHODS:
        raise LoraforgeError(f"--majority-sign must be one of {', '.join(SIGN_METHODS)}, got {majority_sign!r}")
    return weights


def _parse(weights: AdapterWeights) -> _Parsed:
    """The adapter's factors by module path, and the embedding base weights PEFT saves beside them; refuses what
    does not combine (DoRA, biases, saved modules)."""
    config, where = weights.config, f"adapter {weights.source}"
    config.check_on_original_base(where)
    if config.use_dora:
        raise LoraforgeError(f"{where} is a DoRA adapter (use_dora): its magnitude vector rescales the whole updated "
                             "weight, so DoRA updates do not add and cannot be combined. Combine plain LoRA adapters, "
                             "or merge it (loraforge merge) into its base")
    if config.bias != "none":
        raise LoraforgeError(f"{where} trains biases (bias={config.bias!r}): they are full weights, not low-rank "
                             "updates, and combine does not mix them; combine adapters trained with bias none")
    if config.modules_to_save or config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        raise LoraforgeError(f"{where} carries trained modules ({', '.join(config.modules_to_save or ['a head'])}): "
                             "heads trained apart, for their own labels, do not average into a head for either task, "
                             "so combine refuses them. Train one adapter on the union of the data instead")
    found: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    base_weights: dict[str, torch.Tensor] = {}
    for key, tensor in weights.tensors.items():
        for kind, pair in _FACTOR_KEYS.items():
            end = next((e for e in pair if key.endswith(e)), None)
            if end is not None:
                path = key[:-len(end)]
                found.setdefault(path, {})["a" if end == pair[0] else "b"] = tensor
                kinds[path] = kind
                break
        else:
            if not key.endswith(".base_layer.weight"):
                raise LoraforgeError(f"{where}: key {PEFT_PREFIX}{key} is not a LoRA factor (a saved module or a "
                                     "trained bias); combine mixes LoRA factors only")
            base_weights[key] = tensor
    for key in base_weights:
        if kinds.get(key.removesuffix(".base_layer.weight")) != "embedding":
            raise LoraforgeError(f"{where}: key {PEFT_PREFIX}{key} is a full base weight of a module without "
                                 "embedding LoRA; combine mixes LoRA factors only")
    modules: dict[str, _Factors] = {}
    for path, pair in found.items():
        if set(pair) != {"a", "b"}:
            raise LoraforgeError(f"{where}: {path} has only one of its two LoRA factors; the file is incomplete")
        r, alpha = config.rank_and_alpha(path)
        a, b = pair["a"].double(), pair["b"].double()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoraforgeError(f"{where}: {path} has factors {tuple(a.shape)} and {tuple(b.shape)}, but its config "
                                 f"says r={r}: the files do not belong together")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoraforgeError(f"{where}: {path} holds NaN/inf weights; the adapter is broken")
        modules[path] = _Factors(kinds[path], a, b, lora_scaling(r, alpha, config.use_rslora))
    if not modules:
        raise LoraforgeError(f"{where} holds no LoRA factors")
    return _Parsed(weights.source, config, modules, base_weights)


def _check_same_base(parsed: list[_Parsed]) -> None:
    for field, what in (("base_model_name_or_path", "base models"), ("task_type", "task types")):
        values = {p.source: getattr(p.config, field) for p in parsed if getattr(p.config, field) is not None}
        if len(set(values.values())) > 1:
            listed = "; ".join(f"{src}: {v}" for src, v in values.items())
            raise LoraforgeError(f"the adapters were made for different {what} ({field} in adapter_config.json: "
                                 f"{listed}); only adapters trained on the same base combine")
    kept: dict[str, tuple[torch.Tensor, str]] = {}
    for p in parsed:
        for key, tensor in p.base_weights.items():
            if key in kept and not torch.equal(kept[key][0], tensor):
                raise LoraforgeError(f"adapters {kept[key][1]} and {p.source} save different base weights for "
                                     f"{PEFT_PREFIX}{key}: they were trained on different (resized) embeddings")
            kept.setdefault(key, (tensor, p.source))


def _check_module(path: str, parts: list[tuple[float, _Factors, str]]) -> str:
    """The module's kind; refuses factors of different layers at one path (another base)."""
    shapes = {src: (f.kind, f.b.shape[0], f.a.shape[1]) for _, f, src in parts}
    if len(set(shapes.values())) > 1:
        listed = "; ".join(f"{src}: {k} {o}x{i}" for src, (k, o, i) in shapes.items())
        raise LoraforgeError(f"{path} is not the same layer in every adapter ({listed}): they were made for "
                             "different base models")
    return parts[0][1].kind


def _output_dtype(adapters: Sequence[AdapterWeights]) -> torch.dtype:
    dtype = None
    for adapter in adapters:
        for tensor in adapter.tensors.values():
            dtype = tensor.dtype if dtype is None else torch.promote_types(dtype, tensor.dtype)
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32


# ---- the methods ----------------------------------------------------------------------------------------------
def _cat(parts: list[tuple[float, _Factors]]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([f.a for _, f in parts], dim=0)  # (sum r_i, in)
    b = torch.cat([w * f.scaling * f.b for w, f in parts], dim=1)  # (out, sum r_i)
    return a, b


def _linear(path: str, parts: list[tuple[float, _Factors, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    ranks = {src: f.a.shape[0] for _, f, src in parts}
    if len(set(ranks.values())) > 1:
        listed = ", ".join(f"{src}: r={r}" for src, r in ranks.items())
        raise LoraforgeError(f"--method linear mixes the A's and the B's entry by entry, so it needs one rank at each "
                             f"module, but {path} has {listed}. Use --method cat (exact, rank = the sum) or --method "
                             "svd (exact at full rank, or truncated to --rank)")
    a = sum(math.copysign(math.sqrt(abs(w * f.scaling)), w * f.scaling) * f.a for w, f, _ in parts)  # (r, in)
    b = sum(math.sqrt(abs(w * f.scaling)) * f.b for w, f, _ in parts)  # (out, r)
    return a, b


def _merge(method: str, deltas: torch.Tensor, weights: torch.Tensor, density: float | None, majority_sign: str,
           gen: torch.Generator) -> torch.Tensor:
    """The merged update (out, in) of the task vectors `deltas` (n, out, in), PEFT's merge_utils definitions."""
    if method in ("ties", "magnitude_prune"):
        deltas = torch.stack([_prune_magnitude(d, density) for d in deltas])
    elif method in ("dare_linear", "dare_ties"):
        deltas = torch.stack([_dare(d, density, gen) for d in deltas])
    weighted = deltas * weights.view(-1, 1, 1)  # (n, out, in)
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    signs = deltas.sign()
    votes = deltas.sum(0) if majority_sign == "total" else signs.sum(0)  # (out, in), unweighted as in PEFT
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)  # (n, out, in); a zero entry agrees with no sign
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _prune_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density · numel) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return delta
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().flatten().topk(int(density * delta.numel())).indices] = True
    return delta * keep.view_as(delta)


def _dare(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (drawn from `gen`), rescale the kept ones by 1/density."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=gen)
    return delta * keep / density


def _low_rank_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of B A, from B (out, R) and A (R, in) alone: B = Q_b R_b and Aᵀ = Q_a R_a, so
    B A = Q_b (R_b R_aᵀ) Q_aᵀ and only the small (R, R) core is decomposed: O((out + in) R²), where a full SVD of
    the (out, in) update costs O(out · in · min(out, in))."""
    q_b, r_b = torch.linalg.qr(b)  # (out, p), (p, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # (p, m), (m,), (m, q)
    return q_b @ u, s, vh @ q_a.T  # (out, m), (m,), (m, in)


def _truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
              rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (rank, in), B (out, rank), relative Frobenius error) of the best rank-`rank` approximation of U S Vh,
    the singular values split evenly between B and A, zero-padded where there are fewer than `rank`."""
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, vh.shape[1], dtype=vh.dtype)
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    total = s.square().sum().item()
    error = math.sqrt(s[k:].square().sum().item() / total) if total > 0 else 0.0
    return a, b, error


# ---- the output config ----------------------------------------------------------------------------------------
def _output_config(parsed: list[_Parsed], ranks: dict[str, int]) -> LoraConfig:
    """Scaling 1 at every module: lora_alpha = r, and rank/alpha patterns (keyed by the escaped module path) only
    where a module's rank differs from the most common one."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    targets, exclude = _targets([p.config for p in parsed], sorted(ranks))
    first = parsed[0].config
    return LoraConfig(
        r=r, lora_alpha=r, lora_dropout=first.lora_dropout, target_modules=targets, exclude_modules=exclude,
        use_rslora=False, rank_pattern=pattern, alpha_pattern=dict(pattern),
        fan_in_fan_out=any(p.config.fan_in_fan_out for p in parsed),
        task_type=next((p.config.task_type for p in parsed if p.config.task_type), None),
        base_model_name_or_path=next((p.config.base_model_name_or_path for p in parsed
                                      if p.config.base_model_name_or_path), None))


def _targets(configs: list[LoraConfig], paths: list[str]) -> tuple[list[str] | str | None, list[str] | str | None]:
    """target_modules (and exclude_modules) matching exactly the modules combined: the inputs' own when they all
    agree, the union of their name lists when all are plain lists, else the module paths themselves."""
    specs = {repr((c.target_modules, c.exclude_modules)) for c in configs}
    if len(specs) == 1:
        return configs[0].target_modules, configs[0].exclude_modules
    if all(isinstance(c.target_modules, list) and not c.exclude_modules for c in configs):
        return sorted(set().union(*(c.target_modules for c in configs))), None
    return paths, None
