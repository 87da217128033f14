"""Routing: one base, several single-task adapters, and a probe that picks the adapter for each incoming prompt.

    router = train_router(session, [RouterData("sentiment", "sst2.tsv", recipe="sst2"),
                                    RouterData("ner", "conll.txt", recipe="conll2003")], base_data="chat.jsonl")
    router.save("runs/router")
    routes, outputs = generate_routed(session, Router.load("runs/router"), prompts)  # one mixed batch

The router is a linear probe (multinomial logistic regression with L2, scikit-learn's lbfgs: the same data gives the
same weights) on features of the BASE model alone: the last hidden states (`layer`, an index
into `hidden_states`) mean-pooled over the prompt's first `max_length` tokens, standardized by the training
features' mean and std. Its classes are adapter names, plus "base" (route: None, no adapter) for inputs of no task
when base data is given. Each task's prompts are built as generation builds them: the dataset's recipe
(`Recipe.encode_prompt`; default: the recipe the adapter was trained with, from its train_config.yaml), else the
record's own shape (text: the text as a plain prompt; instruction, prompt/completion, chat: the ids before the first
answer). A seeded, per-class share is held out and the router's accuracy on it (overall and per class) is kept in
router.json beside router.safetensors (weight, bias, mean, std; read with safetensors, never pickle).

Cost at serving time: one extra forward of the base over each prompt's first `max_length` tokens (batched, no KV
cache kept), plus a (B, D) x (D, C) matmul; decoding is untouched. With `layer` = k, an early decoder layer, the
forward stops after layer k (`prompt_features`): k/L of a prefill. It cannot simply be the prefill, since the
prefill runs each row on its adapter, and an adapter changes the hidden states from its first adapted layer on.
Ways to share more of it later: where adapters leave the first k layers alone, those layers' KV cache is the same
for every route, so the routing forward's cache could seed the engine's prefill, which would then start at layer k.
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from loraforge.config import adapter_recipe
from loraforge.data import (TokenizedExample, collate, detect_format, make_recipe, pad_id_for, prompt_ids,
                            read_records, to_example)
from loraforge.data.readers import Record
from loraforge.errors import LoraforgeError
from loraforge.infer.engine import SamplingParams
from loraforge.infer.generate import generate_many
from loraforge.infer.session import InferenceSession
from loraforge.lora.adapter import atomic_write

log = logging.getLogger("loraforge")
BASE = "base"
"""The class of inputs that belong to no task: routed to None, the base model with no adapter."""
ROUTER_WEIGHTS, ROUTER_META = "router.safetensors", "router.json"
FORMAT = "loraforge-router/1"
_TENSORS = ("weight", "bias", "mean", "std")


@dataclass(frozen=True)
class RouterData:
    """One class of the router: a file of that task's inputs and how its records become prompts."""

    name: str
    """The adapter that serves these inputs ("base": inputs of no task, served by the base alone)."""
    path: str | Path
    recipe: str | None = None
    """A task recipe (sst2, e2e, ...); default: the adapter's own (its train_config.yaml), else the record shape."""
    columns: Mapping[str, str] | None = None
    """Field renames, ours -> the file's (as `--columns`)."""
    file_format: str | None = None
    """The reader, when the suffix does not say (jsonl, json, csv, tsv, text, conll)."""


@dataclass(eq=False)
class Router:
    """A linear probe over standardized, mean-pooled base hidden states: logits = ((x - mean) / std) Wᵀ + b."""

    classes: list[str]
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    base: str
    """The base model the features come from, as the session names it."""
    hidden_size: int
    layer: int = -1
    """Index into the model's `hidden_states` (-1: the last, after the final norm)."""
    max_length: int = 512
    """Prompt tokens read (the first ones)."""
    accuracy: float | None = None
    """On the held-out share; None when nothing was held out."""
    per_class_accuracy: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per class: records in its file, prompts trained on, prompts held out."""
    settings: dict[str, Any] = field(default_factory=dict)
    """How it was trained (seed, l2, val_split, max_examples, each class's file and recipe)."""
    source: str = "the router"

    # ---- serving ------------------------------------------------------------------------------------------------
    def check(self, session: InferenceSession) -> None:
        """Refuse a session whose base is not the one the router was trained on."""
        hidden = _hidden_size(session)
        if _base_key(self.base) != _base_key(session.base) or hidden != self.hidden_size:
            raise LoraforgeError(f"{self.source} was trained on base {self.base!r} (hidden size {self.hidden_size}); "
                                 f"this session's base is {session.base!r} (hidden size {hidden}). A router reads "
                                 "its own base's hidden states: give --model for its base, or train one for this base")

    def require_adapters(self, names: Sequence[str]) -> None:
        """Refuse when the adapters given are not exactly the router's classes (besides "base")."""
        wanted = [c for c in self.classes if c != BASE]
        missing, extra = sorted(set(wanted) - set(names)), sorted(set(names) - set(wanted))
        if missing or extra:
            raise LoraforgeError(f"{self.source} chooses among {', '.join(self.classes)}, but the adapters given "
                                 f"are {', '.join(names) or 'none'}"
                                 + (f"; missing: {', '.join(missing)}" if missing else "")
                                 + (f"; not in the router: {', '.join(extra)}" if extra else "")
                                 + ". Give --adapter for exactly the router's adapters")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled features -> (N, C) logits."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def probabilities(self, session: InferenceSession, prompts: Sequence[Sequence[int]],
                      batch_size: int = 16) -> torch.Tensor:
        """(N, C) each prompt's probability of each class, in `classes` order."""
        self.check(session)
        features = prompt_features(session, prompts, layer=self.layer, max_length=self.max_length,
                                   batch_size=batch_size)
        return self.logits(features).softmax(-1)

    def route(self, session: InferenceSession, prompts: Sequence[Sequence[int]], batch_size: int = 16
              ) -> list[str | None]:
        """The adapter for each prompt (None: the base), from its prompt ids as generation feeds them."""
        chosen = self.probabilities(session, prompts, batch_size).argmax(-1).tolist()
        return [None if self.classes[k] == BASE else self.classes[k] for k in chosen]

    # ---- files --------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """router.safetensors (weight, bias, mean, std) and router.json (classes, base, features, accuracy)."""
        out = Path(directory)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ROUTER_META).is_file())):
            raise LoraforgeError(f"{out} exists and is neither empty nor a router folder; give a new folder")
        out.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().float().contiguous() for name in _TENSORS}
        atomic_write(out / ROUTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        meta = {"format": FORMAT, "classes": self.classes, "base": self.base, "hidden_size": self.hidden_size,
                "feature_dim": int(self.weight.shape[1]), "pooling": "mean", "layer": self.layer,
                "max_length": self.max_length, "accuracy": self.accuracy,
                "per_class_accuracy": self.per_class_accuracy, "counts": self.counts, "settings": self.settings}
        atomic_write(out / ROUTER_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n",
                                                                         encoding="utf-8"))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Router:
        """A saved router, every file and shape checked (safetensors only, nothing unpickled)."""
        folder = Path(directory)
        meta_path, weights_path = folder / ROUTER_META, folder / ROUTER_WEIGHTS
        if not meta_path.is_file() or not weights_path.is_file():
            raise LoraforgeError(f"{folder} is not a router folder: it needs {ROUTER_META} and {ROUTER_WEIGHTS} "
                                 "(written by loraforge router --output DIR)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(weights_path)
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as err:
            raise LoraforgeError(f"{folder}: cannot read the router ({err}); write it again with loraforge "
                                 "router") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LoraforgeError(f"{meta_path}: not a {FORMAT} file")
        try:
            classes, dim = [str(c) for c in meta["classes"]], int(meta["feature_dim"])
            router = cls(classes, *(tensors[name] for name in _TENSORS), base=str(meta["base"]),
                         hidden_size=int(meta["hidden_size"]), layer=int(meta["layer"]),
                         max_length=int(meta["max_length"]), accuracy=meta.get("accuracy"),
                         per_class_accuracy=meta.get("per_class_accuracy", {}), counts=meta.get("counts", {}),
                         settings=meta.get("settings", {}), source=f"router {folder}")
        except (KeyError, TypeError, ValueError) as err:
            raise LoraforgeError(f"{folder}: the router files are incomplete ({err!r} is missing or wrong)") from None
        shapes = {"weight": (len(classes), dim), "bias": (len(classes),), "mean": (dim,), "std": (dim,)}
        for name, shape in shapes.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape or not torch.isfinite(tensor).all():
                raise LoraforgeError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                                     "of finite numbers; the two router files do not belong together")
        if set(tensors) != set(_TENSORS):
            raise LoraforgeError(f"{weights_path}: holds {sorted(tensors)}, expected {list(_TENSORS)}")
        return router


# ---- features -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def prompt_features(session: InferenceSession, prompts: Sequence[Sequence[int]], *, layer: int = -1,
                    max_length: int = 512, batch_size: int = 16) -> torch.Tensor:
    """(N, D) float32: the base's hidden states `layer` mean-pooled over each prompt's first `max_length` tokens.
    Prompts go in batches of similar length, right-padded (causal attention: padding after a row never reaches it).

    `layer` indexes transformers' `hidden_states` (0: the embeddings, i: the output of decoder layer i, -1: the
    last, after the final norm). For 0 < layer < the number of layers the forward stops after decoder layer
    `layer`: the layers above it are never run, so routing costs layer/L of a prefill (same values as the full
    forward's `hidden_states[layer]`)."""
    if session.kind != "causal-lm":
        raise LoraforgeError(f"routing picks adapters for generation; this session serves {session.kind} heads")
    if any(len(p) == 0 for p in prompts):
        raise LoraforgeError("a prompt is empty: every prompt needs at least one token to route")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pooled: list[torch.Tensor | None] = [None] * len(prompts)
    pad = pad_id_for(session.tokenizer)
    with session.use(None) as model:  # the base alone
        stop_after = _stop_layer(model, layer)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = [list(prompts[i])[:max_length] for i in chunk]
            batch = collate([TokenizedExample(r, r) for r in rows], pad)  # right-padded (labels unused)
            ids, mask = batch["input_ids"].to(session.device), batch["attention_mask"].to(session.device)  # (n, T)
            hidden = _hidden(model, ids, mask, layer, stop_after).float()  # (n, T, D)
            m = mask[..., None].float()  # (n, T, 1)
            means = ((hidden * m).sum(1) / m.sum(1)).cpu()  # (n, D)
            for i, index in enumerate(chunk):
                pooled[index] = means[i]
    return torch.stack(pooled) if pooled else torch.empty(0, _hidden_size(session))


class _Stop(Exception):
    """Raised by the hook on the last decoder layer a feature needs, carrying that layer's output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden


def _stop_layer(model, layer: int):
    """The decoder layer whose output is `hidden_states[layer]`, when the forward can stop there; else None."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not 0 < layer < len(layers):
        return None
    return layers[layer - 1]


def _hidden(model, ids: torch.Tensor, mask: torch.Tensor, layer: int, stop_after) -> torch.Tensor:
    if stop_after is None:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
        return out.hidden_states[layer]

    def stop(module, args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = stop_after.register_forward_hook(stop)
    try:
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop as done:
        return done.hidden
    finally:
        handle.remove()
    raise RuntimeError("the routing forward did not reach its feature layer")


# ---- training -----------------------------------------------------------------------------------------------------
def train_router(session: InferenceSession, datasets: Sequence[RouterData] | Mapping[str, str | Path], *,
                 base_data: str | Path | RouterData | None = None, max_examples: int = 200, val_split: float = 0.2,
                 seed: int = 0, l2: float = 1e-3, layer: int = -1, max_length: int = 512,
                 batch_size: int = 16) -> Router:
    """Train a router over `session`'s adapters: one class per dataset (named by a loaded adapter), plus "base"
    when `base_data` is given. Each class's prompts are capped at `max_examples` (a seeded sample) and a seeded
    `val_split` share of them is held out to measure the router's accuracy."""
    specs = list(datasets) if not isinstance(datasets, Mapping) else [RouterData(n, p) for n, p in datasets.items()]
    if base_data is not None:
        specs.append(base_data if isinstance(base_data, RouterData) else RouterData(BASE, base_data))
    _check_training(session, specs, max_examples, val_split, l2)
    rng = random.Random(seed)
    train_x, train_y, val_x, val_y, counts = [], [], [], [], {}
    for k, spec in enumerate(specs):
        records = list(read_records(spec.path, spec.file_format))
        if not records:
            raise LoraforgeError(f"{spec.path}: no records, so the router cannot learn {spec.name!r}")
        chosen = sorted(rng.sample(range(len(records)), min(max_examples, len(records))))
        encode = _prompt_encoder(session, spec)
        prompts = [encode(records[i]) for i in chosen]
        rng.shuffle(prompts)
        n_val = min(len(prompts) - 1, math.ceil(len(prompts) * val_split)) if val_split else 0
        features = prompt_features(session, prompts, layer=layer, max_length=max_length, batch_size=batch_size)
        val_x.append(features[:n_val])
        train_x.append(features[n_val:])
        val_y += [k] * n_val
        train_y += [k] * (len(prompts) - n_val)
        counts[spec.name] = {"records": len(records), "train": len(prompts) - n_val, "val": n_val}
    x, y = torch.cat(train_x), torch.tensor(train_y)
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a constant feature: leave it unscaled
    weight, bias = fit_probe((x - mean) / std, y, len(specs), l2)
    classes = [spec.name for spec in specs]
    settings = {"seed": seed, "l2": l2, "val_split": val_split, "max_examples": max_examples,
                "data": {s.name: {"path": str(s.path), "recipe": _recipe_name(session, s)} for s in specs}}
    router = Router(classes, weight, bias, mean, std, base=session.base, hidden_size=_hidden_size(session),
                    layer=layer, max_length=max_length, counts=counts, settings=settings)
    if val_y:
        predicted = router.logits(torch.cat(val_x)).argmax(-1)
        truth = torch.tensor(val_y)
        router.accuracy = float((predicted == truth).float().mean())
        for k, name in enumerate(classes):
            rows = truth == k
            router.per_class_accuracy[name] = float((predicted[rows] == k).float().mean()) if rows.any() else None
    return router


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int = 1000
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression minimising mean cross-entropy + l2/2 ||W||² (the bias unpenalized):
    scikit-learn's `LogisticRegression` (lbfgs, deterministic) with C = 1 / (l2 N); (C, D) weight and (C,) bias."""
    from sklearn.linear_model import LogisticRegression

    if not set(y.tolist()) == set(range(n_classes)):
        raise LoraforgeError(f"the router's training data lacks classes: has {sorted(set(y.tolist()))} of "
                             f"{n_classes}")
    model = LogisticRegression(C=1.0 / (l2 * len(y)), max_iter=max_iter, tol=1e-8)
    model.fit(x.double().numpy(), y.numpy())
    weight = torch.from_numpy(model.coef_).float().contiguous()  # (C, D) as saved and loaded: the same kernel
    bias = torch.from_numpy(model.intercept_).float().contiguous()
    if n_classes == 2:  # scikit-learn keeps one row for two classes: logits (0, w x + b) give the same softmax
        weight, bias = torch.cat([torch.zeros_like(weight), weight]), torch.cat([torch.zeros_like(bias), bias])
    return weight, bias


def _check_training(session: InferenceSession, specs: list[RouterData], max_examples: int, val_split: float,
                    l2: float) -> None:
    names = [s.name for s in specs]
    for name in names:
        if name != BASE and name not in session.adapters:
            raise LoraforgeError(f"data for {name!r}, but no adapter of that name is loaded (loaded: "
                                 f"{', '.join(session.adapters) or 'none'}); name each dataset by its adapter")
    if BASE in session.adapters:
        raise LoraforgeError(f"an adapter is named {BASE!r}, the router's name for inputs of no task; rename it")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LoraforgeError(f"more than one dataset for {', '.join(repeated)}; give one file per adapter")
    if len(specs) < 2:
        raise LoraforgeError("a router needs at least two classes: data for two adapters, or one and base data")
    if max_examples < 1 or not 0 <= val_split < 1 or l2 < 0:
        raise LoraforgeError(f"max_examples must be at least 1 (got {max_examples}), val_split in [0, 1) (got "
                             f"{val_split}), l2 at least 0 (got {l2})")


def _recipe_options(session: InferenceSession, spec: RouterData) -> dict[str, Any]:
    """The recipe declaration a dataset is read with: its own, else its adapter's (train_config.yaml), else {}."""
    if spec.recipe:
        return {"recipe": spec.recipe, "columns": spec.columns}
    saved = adapter_recipe(session.adapters[spec.name].source) if spec.name in session.adapters else {}
    if saved and spec.columns:
        saved = {**saved, "columns": {**(saved.get("columns") or {}), **spec.columns}}
    return saved


def _recipe_name(session: InferenceSession, spec: RouterData) -> str | None:
    return _recipe_options(session, spec).get("recipe")


def _prompt_encoder(session: InferenceSession, spec: RouterData):
    """record -> prompt ids, as generation would be fed them for this dataset."""
    tokenizer, options = session.tokenizer, _recipe_options(session, spec)
    if options:
        recipe = make_recipe(**options)
        if recipe.chunked:  # `lm`: the document itself is the prompt
            return lambda record: list(tokenizer(recipe.target(record))["input_ids"])
        return lambda record: recipe.encode_prompt(record, tokenizer)

    def encode(record: Record) -> list[int]:
        fmt = detect_format(record, spec.columns)
        example = to_example(record, fmt, chat_template_tokenizer=tokenizer, columns=spec.columns)
        if fmt == "text":  # a plain prompt, as `loraforge generate --prompt TEXT` tokenizes it
            return list(tokenizer(example.response)["input_ids"])
        return prompt_ids(example, tokenizer)

    return encode


def _hidden_size(session: InferenceSession) -> int:
    return int(session.model.config.get_text_config().hidden_size)


def _base_key(base: str) -> str:
    """A folder by its resolved path, anything else (a built-in name, a Hub id) as written."""
    path = Path(base)
    return str(path.resolve()) if path.exists() else base


# ---- generation ---------------------------------------------------------------------------------------------------
def generate_routed(session: InferenceSession, router: Router, prompts: Sequence[Sequence[int]],
                    params: SamplingParams = SamplingParams(), *, adapters: Mapping[str, str] | None = None,
                    max_batch: int = 16) -> tuple[list[str | None], list[list[int]]]:
    """Route each prompt, then decode them all together, each row on its routed adapter (one mixed batch through
    the engine). `adapters` maps a router class to the session's name for it (default: the same name).
    Returns the routes (None: the base) and each prompt's new ids, in the order given."""
    adapters = dict(adapters or {})
    for name in router.classes:
        if name != BASE:
            session.check_adapter(adapters.get(name, name))
    routes = router.route(session, prompts)
    names = [None if r is None else adapters.get(r, r) for r in routes]
    return routes, generate_many(session, [list(p) for p in prompts], params, names, max_batch)
