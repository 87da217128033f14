"""The decode-step engine: every active request advances one token per step, each on its own adapter.

    engine = Engine(session, max_batch=16)
    done = engine.run([Request(ids, adapter="alice"), Request(ids2, params=SamplingParams(temperature=0.7, seed=1))])

One step (`Engine.step`):
1. the active rows decode one token together: one forward of (B, 1) last tokens, row i routed to its adapter;
2. waiting requests join, up to `max_batch`: their prompts are prefilled together (left-padded, so each row's last
   prompt token is in the last column) and their KV cache is appended to the active rows' (left-padded to a common
   length along the sequence, stacked along the batch);
3. each row picks its next token (greedy, or temperature/top-k/top-p with its own seeded `torch.Generator`, never
   the global RNG); a row that meets a stop token or its `max_new_tokens` leaves, and its cache row is dropped.

The attention mask hides padding and each row gets its own position ids, so a row sees exactly what it would see
alone: the same tokens as that request decoded by itself, up to float rounding in kernels whose reduction order
depends on the batch shape (tested). Requests join and leave between steps: continuous batching.

A shared prefix (`Engine(..., prefix=ids)`, e.g. the K solved examples of a few-shot prompt, found by
`shared_prefix`) runs once per adapter; a joining request that starts with it prefills only the rest of its
prompt, on a copy of the prefix's keys and values (the prompt then reads [prefix][padding][rest], the padding
masked, positions counted over real tokens only, so the row still sees what it would alone).
"""
from __future__ import annotations

import inspect
import itertools
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loraforge.errors import LoraforgeError
from loraforge.infer.decode import decode_step, supports
from loraforge.infer.session import InferenceSession


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; otherwise top-k, then top-p, then a seeded draw."""

    max_new_tokens: int = 64
    """Tokens to generate at most (a stop token counts)."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample from the smallest set of tokens whose probability reaches top_p (1: all)."""
    top_k: int = 0
    """Sample from the k most likely tokens (0: all)."""
    seed: int | None = None
    """Seed of this request's own generator (None: a random one); the same seed gives the same text."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request, besides the model's EOS/end-of-turn."""
    ignore_eos: bool = False
    """Generate `max_new_tokens` whatever comes (benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise LoraforgeError(f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise LoraforgeError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LoraforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise LoraforgeError(f"top_k must be a whole number >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """A prompt to continue, on an adapter (None: the base), and what it has generated so far."""

    prompt_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = SamplingParams()
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """"stop" (a stop token, which ends output_ids), "length" (max_new_tokens reached) or "cancelled"."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Row:
    request: Request
    generator: torch.Generator | None
    stops: frozenset[int]
    position: int  # the position id of the next token fed in: tokens in the cache so far


SHARED_PREFIX_MIN = 64
"""A prefix that all prompts share runs once when it is at least this many tokens (`shared_prefix`)."""


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, less one (each prompt keeps a token of its own to continue
    from); 0 when that is under `SHARED_PREFIX_MIN`."""
    shared = len(os.path.commonprefix([list(p) for p in prompts])) - 1 if prompts else 0
    return shared if shared >= SHARED_PREFIX_MIN else 0


class Engine:
    """Continuous batching over one `InferenceSession`: requests on any adapters, decoded together; `prefix`: tokens
    most prompts start with, run once per adapter (module docstring)."""

    def __init__(self, session: InferenceSession, max_batch: int = 16, prefix: Sequence[int] = ()):
        if session.kind != "causal-lm":
            raise LoraforgeError(f"the engine generates text; this session serves {session.kind} heads")
        if max_batch < 1:
            raise LoraforgeError(f"max_batch must be at least 1, got {max_batch}")
        self.session = session
        self.model = session.model
        self.max_batch = max_batch
        self.stop_ids = frozenset(stop_ids(session.tokenizer, self.model))
        pad = session.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.stop_ids, default=0)
        self.lean = supports(self.model)  # the written-out decode step (infer/decode.py) where it applies
        self.cache_kw = cache_keyword(self.model)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None) or \
            getattr(self.model.config, "n_positions", None)
        self.waiting: deque[Request] = deque()
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.prefix = list(prefix)
        self.prefix_kv: dict[str | None, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # adapter -> per layer
        self.mask: torch.Tensor | None = None  # (B, T) 1 where the cache holds a real token
        self.last: torch.Tensor | None = None  # (B,) each row's newest token, fed in at the next decode

    # ---- requests -----------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the batch at the next step with room."""
        if not request.prompt_ids:
            raise LoraforgeError("a prompt is empty: every prompt needs at least one token to continue")
        self.session.check_adapter(request.adapter)
        total = len(request.prompt_ids) + request.params.max_new_tokens
        if self.max_positions and total > self.max_positions:
            raise LoraforgeError(f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                                 f"({request.params.max_new_tokens}) = {total} exceeds the model's context of "
                                 f"{self.max_positions} tokens; shorten the prompt or lower max_new_tokens")
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` now (a client went away, or its text met a stop string): it leaves the queue or the batch,
        and its cache row is freed before the next step. Call it between steps."""
        if request.finish_reason is None:
            request.finish_reason = "cancelled"
        if request in self.waiting:
            self.waiting.remove(request)
        keep = [i for i, row in enumerate(self.rows) if row.request is not request]
        if len(keep) < len(self.rows):
            self._keep(keep)

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def run(self, requests: Iterable[Request]) -> list[Request]:
        """Submit `requests` and step until all are done; returns them in the order given."""
        requests = [self.submit(r) for r in requests]
        while self.has_work:
            self.step()
        return requests

    # ---- one step -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Decode one token for every active row, let waiting requests join; the requests that finished."""
        tokens: list[int] = []
        if self.rows:
            tokens = self._next(self._decode())
        joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_batch - len(self.rows)))]
        if joining:
            tokens += self._next(self._prefill(joining), first=len(self.rows) - len(joining))
        rows, finished, keep = self.rows, [], []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            request = row.request
            request.output_ids.append(token)
            if token in row.stops:
                request.finish_reason = "stop"
            elif len(request.output_ids) >= request.params.max_new_tokens:
                request.finish_reason = "length"
            (finished if request.done else keep).append(i)
        self.last = torch.tensor(tokens, dtype=torch.long, device=self.session.device)
        if finished:
            self._keep(keep)
        return [rows[i].request for i in finished]

    def _decode(self) -> torch.Tensor:
        """One forward of each row's newest token; logits (B, V)."""
        self.session.route([row.request.adapter for row in self.rows])
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (B, T+1)
        positions = torch.tensor([[row.position] for row in self.rows], device=self.session.device)  # (B, 1)
        if self.lean:
            logits = self._forward(decode_step, self.model, self.last[:, None], positions, self.mask, self.cache)
        else:
            logits = self._forward(self.model, input_ids=self.last[:, None], attention_mask=self.mask,
                                   position_ids=positions, use_cache=True, logits_to_keep=1,
                                   **{self.cache_kw: self.cache}).logits[:, -1].float()
        for row in self.rows:
            row.position += 1
        return logits

    def _prefill(self, requests: list[Request]) -> torch.Tensor:
        """Prefill the joining requests together (after the shared prefix's cached keys and values, when they all
        start with it); append their rows and cache; their last-token logits (n, V)."""
        device = self.session.device
        P = len(self.prefix)
        if not P or not all(len(r.prompt_ids) > P and r.prompt_ids[:P] == self.prefix for r in requests):
            P = 0
        T = max(len(r.prompt_ids) for r in requests) - P
        ids = torch.full((len(requests), T), self.pad_id, dtype=torch.long)  # (n, T), the rests left-padded
        mask = torch.zeros((len(requests), P + T), dtype=torch.long)  # (n, P + T)
        mask[:, :P] = 1
        for i, r in enumerate(requests):
            rest = r.prompt_ids[P:]
            ids[i, T - len(rest):] = torch.tensor(rest)
            mask[i, P + T - len(rest):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = self._new_cache(GrowingLayer)
        if P:  # each row's copy of the prefix, written straight into the layer's buffer
            kv = [self._prefix_kv(r.adapter) for r in requests]
            for i, layer in enumerate(cache.layers):
                layer.stack([row[i] for row in kv])
        self.session.route([r.adapter for r in requests])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]  # (n, T)
        out = self._forward(self.model, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{self.cache_kw: cache})
        self._append(cache, mask)
        for r in requests:
            self.rows.append(_Row(r, _generator(r.params, device), frozenset(r.params.stop_token_ids)
                                  | (frozenset() if r.params.ignore_eos else self.stop_ids), len(r.prompt_ids)))
        return out.logits[:, -1].float()

    def _new_cache(self, layer_type: type = DynamicLayer) -> DynamicCache:
        """An empty KV cache for the model whose layers are `layer_type` (full attention only)."""
        cache = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise LoraforgeError(f"{type(self.model).__name__} uses a sliding-window or other special KV cache, "
                                 "which the engine does not batch yet")
        cache.layers = [layer_type() for _ in cache.layers]
        return cache

    def _prefix_kv(self, adapter: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The shared prefix's keys and values on `adapter`, (1, H, P, D) per layer: run on first use."""
        if adapter not in self.prefix_kv:
            cache = self._new_cache()
            self.session.route([adapter])
            self._forward(self.model, input_ids=torch.tensor([self.prefix], device=self.session.device),
                          use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
            self.prefix_kv[adapter] = [(layer.keys, layer.values) for layer in cache.layers]
        return self.prefix_kv[adapter]

    def _forward(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` with the layers' few-row kernel on (`lora.multi`)."""
        routing = self.session.lora.routing
        routing.small_batch_kernel = True
        try:
            return fn(*args, **kwargs)
        finally:
            routing.small_batch_kernel = False

    def _next(self, logits: torch.Tensor, first: int = 0) -> list[int]:
        """The next token of rows first, first+1, ... from their logits (n, V)."""
        rows = self.rows[first:first + len(logits)]
        tokens = logits.argmax(-1).tolist()  # (n,) greedy for all; sampled rows are redrawn below
        for i, row in enumerate(rows):
            if not row.request.params.greedy:
                tokens[i] = _sample(logits[i], row.request.params, row.generator)
        return tokens

    # ---- the batch's KV cache -----------------------------------------------------------------------------------
    def _append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Stack a new cache (n rows) under the active rows' cache, left-padding the shorter to the longer."""
        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
            return
        T = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.stack([(old.keys, old.values), (new.keys, new.values)])  # (B+n, H, T, D)
        self.mask = torch.cat([F.pad(self.mask, (T - self.mask.shape[1], 0)), F.pad(mask, (T - mask.shape[1], 0))])

    def _keep(self, keep: list[int]) -> None:
        """Drop finished rows, then the leading columns no remaining row uses."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = None
            return
        index = torch.tensor(keep, device=self.session.device)
        self.mask, self.last = self.mask[index], self.last[index]
        start = int(self.mask.any(dim=0).long().argmax())  # first column any row still uses
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.set(layer.keys[index, :, start:], layer.values[index, :, start:])


class GrowingLayer(DynamicLayer):
    """A KV-cache layer that writes each step's keys and values into spare room at the end of a buffer, growing
    it by doubling, instead of `torch.cat`-ing the whole cache every step (10% of a decode step on this CPU).
    `keys`/`values` are views of the used part, (B, H, T, D), as transformers' attention expects."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.set(key_states, value_states)
            return self.keys, self.values
        used, new = self.keys.shape[2], key_states.shape[2]
        if used + new > self._k.shape[2]:
            self.set(self.keys, self.values, room=used + new)
        self._k[:, :, used:used + new] = key_states
        self._v[:, :, used:used + new] = value_states
        self.keys, self.values = self._k[:, :, :used + new], self._v[:, :, :used + new]
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor, room: int = 0) -> None:
        """Hold exactly `keys`/`values` (B, H, T, D), in a buffer with room for max(2T, room, T + 64) tokens."""
        self.stack([(keys, values)], room)

    def stack(self, parts: list[tuple[torch.Tensor, torch.Tensor]], room: int = 0) -> None:
        """Hold the rows of `parts`, (keys, values) pairs of (b, H, t, D), stacked in order along the batch, each
        right-aligned to the longest t with zeros before a shorter one (left padding, which the mask hides); each
        part is copied once, into a buffer with room for max(2T, room, T + 64) tokens."""
        keys, values = parts[0]
        B, T = sum(k.shape[0] for k, _ in parts), max(k.shape[2] for k, _ in parts)
        capacity = max(2 * T, room, T + 64)
        self._k = keys.new_empty((B, keys.shape[1], capacity, keys.shape[3]))
        self._v = values.new_empty((B, values.shape[1], capacity, values.shape[3]))
        first = 0
        for k, v in parts:
            b, t = k.shape[0], k.shape[2]
            self._k[first:first + b, :, :T - t] = 0
            self._v[first:first + b, :, :T - t] = 0
            self._k[first:first + b, :, T - t:T], self._v[first:first + b, :, T - t:T] = k, v
            first += b
        self.keys, self.values = self._k[:, :, :T], self._v[:, :, :T]
        self.device, self.is_initialized = keys.device, True


def cache_keyword(model) -> str:
    """The name `model`'s forward takes its KV cache by: `cache` since transformers 5.2x, `past_key_values` before
    (an unknown keyword is swallowed by `**kwargs`, and the model would then fill a cache of its own)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def stop_ids(tokenizer, model) -> list[int]:
    """EOS ids from the generation config and tokenizer (chat models stop at their end-of-turn token)."""
    ids: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator(device=device).manual_seed(seed)


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One draw from logits (V,) after temperature, top-k and top-p (transformers' warpers' rules)."""
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - params.top_p
        remove[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
