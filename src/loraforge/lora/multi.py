"""Many adapters on one frozen base, served together: row i of a batch uses adapter k_i, or none (the base alone).

    y_i = base(x_i) + s_k · B_k A_k x_i,   k = k_i   (nothing is added for a base row)

This is the serving layer (STYLE.md: the training layer holds one adapter). Adapters are read from PEFT-format files
(`lora.adapter.read_adapter`) and put into numbered *slots*; one `Routing` object, shared by every layer, holds
each row's slot for the next forward. Kernels, chosen by measurement (bench/RESULTS.md, "multi-adapter kernels"):

- a few rows (the engine's decode step, `Routing.small_batch_kernel`): one C++ pass per group of layers that share
  an input (`lora/csrc/sgmv.cpp`, Punica's SGMV fused into the base matmul, compiled on first use by `lora.sgmv`):
  yᵀ = W xᵀ + b + each row's own s·B A xᵀ, with the rows as the short dimension (1.2-2.9x MKL's sgemm on this
  machine's AVX2 cores for 16 rows). Every present adapter's A and B are read once, whatever number of rows use it.
  A mix of `LANES_MIN` or more adapters takes the lane kernel (`linear_lanes_`): each present adapter holds a lane
  (`Routing.lanes`, kept while it stays in the mix) and every layer a copy of the mix's adapters interleaved by
  lane (`_lane_stack`), read as one stream with each row's lane picked by a permute: about half the adapters' cost
  of the other form (bench/RESULTS.md), for one more copy of adapters: as many lanes as the largest such mix so far
  needed (rounded up to 8), kept for the next mix, outside a store's resident cap (`MultiLoraModel.lane_bytes`). A
  request joining with an adapter already in a lane copies nothing; a new adapter copies itself into a lane once
  (and a mix needing more lanes than any before moves the copy into a larger one). Fewer adapters are read where
  they live (a table of addresses), so their joining or leaving copies nothing. Where the kernel cannot be
  built (no C++ compiler), or the weights are not fp32 on a CPU, torch's matmul computes W xᵀ, and the fallback
  stacks the A's into one (G·R, in) and the B's into one (out, G·R) matrix: one matmul gives every row's
  projection on every present adapter, a 0/1 mask keeps each row's own block, one more matmul adds it (three ops a
  layer, G times the FLOPs, and the stacks are copied again when the mix changes). No Python loop over rows or
  adapters either way.
- prefill (many tokens per row): a few tokens per adapter go through the kernel too, every token a row; longer
  prompts take one (x A_kᵀ) B_kᵀ per adapter present, on that adapter's rows only (`_add_prefill`).

A base row gets exactly +0 from the kernel's and the fallback's zeros: its output is what the base computes on the
same batch, bit for bit, and a batch with no adapter row skips the LoRA branch entirely. The scaling (alpha/r, or
alpha/sqrt(r) with rsLoRA, per module with rank/alpha patterns) is applied in the matmul (`alpha=`), or folded into B
when the adapter's dtype or device differs from the base's. DoRA, embedding targets and bias-training adapters are
refused with a message; a merged model has no LoRA left to serve.
"""
from __future__ import annotations

import copy
import struct

import torch
from torch import nn

from loraforge.errors import LoraforgeError
from loraforge.lora import sgmv
from loraforge.lora.layer import Conv1D, linear_features, lora_scaling
from loraforge.lora.model import CLASSIFIER_HEAD_NAMES
from loraforge.lora.targets import check_no_lora, replace_module
from loraforge.quant.linear import QuantLinear, base_weight

SERVED = (nn.Linear, Conv1D, QuantLinear)
"""The base-layer types a `MultiLoraLinear` serves adapters on (a packed base included)."""


SMALL_BATCH_ROWS = 64
"""Up to this many rows (tokens) a layer computes W xᵀ, the faster form for few rows (see `_forward_few_rows`)."""

KERNEL_ROWS = 256
"""Up to this many rows (tokens) a layer the C++ kernel serves computes W xᵀ there, the adapters in the same pass (a
mixed prefill too): 1.1-1.3x MKL's sgemm at 64 rows, even at 176, 5-9% slower at 512-1024 (bench/RESULTS.md)."""

KERNEL_TOKENS_PER_ADAPTER = 32
"""A mixed prefill whose base the C++ pass does not compute (over `KERNEL_ROWS` tokens, or a packed base) adds its
adapters with the kernel's adapters-only form up to this many tokens per adapter present (see `_add_prefill`): one
call a layer where the matmul pairs cost ~25 us per adapter per layer in Python; past it MKL's matmuls win (measured
with the earlier SGMV kernel: break-even near 34 tokens per adapter on SmolLM2-135M, r=16)."""


LANES_MIN = 5
"""A mixed batch (a decode step, or a prefill the kernel serves) with at least this many adapters present takes the
lane kernel (`linear_lanes_`): the batch's adapters copied into each layer interleaved by lane, read as one stream;
with fewer, the 8 lanes of a group would be mostly padding and the kernel reads each adapter where it lives
(bench/RESULTS.md)."""


class Routing:
    """Each row's slot (-1 = the base alone) for the next forward, shared by all `MultiLoraLinear` layers.

    Three cases, cheapest first: no adapter in the batch (`rows is None and uniform is None`); every row on one
    adapter (`uniform`, any batch size: beam search may widen the batch); a mix (`rows`, one slot per row)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.version = 0
        self.uniform: int | None = None
        self.rows: torch.Tensor | None = None  # (B,) int64 on `device`, for a mixed batch
        self.present: list[int] = []  # distinct slots >= 0 of a mixed batch, ascending
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, row indices) per present slot
        self._key: tuple | None = None
        self._rows_of: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # `rows_of`, for the current mix
        self._lanes_of: dict[int, torch.Tensor] = {}  # `lanes_of_tokens`, for the current mix
        self.small_batch_kernel = False  # set by the decode engine: W @ xᵀ for a few rows (see MultiLoraLinear)
        # the lane kernel's assignment, for a mix of LANES_MIN or more adapters: slot -> lane for every slot whose
        # adapter holds a lane (present in the mix or left from an earlier one), the lanes each layer holds (a
        # multiple of 8, never fewer), `lane_epoch` bumped when a slot takes a lane or the lanes grow (the layers'
        # copies to update), and each row's lane (-1: the base)
        self.lanes: dict[int, int] = {}
        self.lane_count = 0
        self.lane_epoch = 0
        self.row_lanes: torch.Tensor | None = None
        self.adapters_version = 0  # bumped by every layer's set_adapter / remove_adapter (`_lane_args`' key)

    def set(self, slots: list[int | None] | None) -> None:
        """Route row i to `slots[i]` (-1 or None: the base); `slots=None`: every row, however many, on the base."""
        key = None if slots is None else tuple(-1 if s is None else s for s in slots)
        if key is not None and len(set(key)) == 1:
            key = ("uniform", key[0])  # one adapter (or the base) for every row, whatever the batch size
        if key == self._key:
            return  # the same mix as the last forward: the layers' stacks stay valid
        self._key, self.version = key, self.version + 1
        self.uniform, self.rows, self.present, self.groups = None, None, [], []
        self._rows_of, self._lanes_of = {}, {}
        self.row_lanes = None
        if key is None:
            return
        if key[0] == "uniform":
            self.uniform = key[1] if key[1] >= 0 else None
            return
        self.rows = torch.tensor(key, dtype=torch.long, device=self.device)
        self.present = sorted({s for s in key if s >= 0})
        self.groups = [(s, (self.rows == s).nonzero().flatten()) for s in self.present]
        if len(self.present) >= LANES_MIN:
            self._assign_lanes()
            self.row_lanes = torch.tensor([self.lanes[s] if s >= 0 else -1 for s in key], dtype=torch.int32)

    def lanes_of_tokens(self, tokens_per_row: int) -> torch.Tensor:
        """Each token's lane (int32) where every row holds `tokens_per_row` tokens in turn (a mixed prefill)."""
        if tokens_per_row == 1:
            return self.row_lanes
        if tokens_per_row not in self._lanes_of:
            self._lanes_of[tokens_per_row] = self.row_lanes.repeat_interleave(tokens_per_row)
        return self._lanes_of[tokens_per_row]

    def _assign_lanes(self) -> None:
        """Give each present slot a lane below the present ones rounded up to 8, so that a step reads as few groups of
        8 lanes as the mix needs. A slot keeps its lane where that is below; the others (a slot in a higher lane
        included) take empty lanes first, then those of slots not in this mix. `lane_count`, the lanes each layer
        holds, only grows: a smaller mix leaves the lanes above as they are, for a later one."""
        needed, present = -(-len(self.present) // 8) * 8, set(self.present)
        lanes = dict(self.lanes)
        occupant = {lane: s for s, lane in lanes.items()}
        new = [s for s in self.present if lanes.get(s, needed) >= needed]
        empty = [lane for lane in range(needed) if lane not in occupant]
        others = [lane for lane in range(needed) if lane in occupant and occupant[lane] not in present]
        for s, lane in zip(new, empty + others):
            lanes.pop(occupant.get(lane), None)
            lanes[s] = lane
        count = max(self.lane_count, needed)
        if new or count != self.lane_count:
            self.lane_epoch += 1
        self.lanes, self.lane_count = lanes, count

    def rows_of(self, slots: tuple[int, ...], n: int, tokens_per_row: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows grouped by slot, offsets (G+1,)) of `slots` (present ones, in `groups` order; `uniform`: all `n` rows
        (tokens) of the call), with every row's `tokens_per_row` tokens as rows i·T ... (a mixed prefill): the
        kernel's arguments, the same for every layer that has these adapters, so made once per mix."""
        key = (slots, n if self.uniform is not None else 0, tokens_per_row)
        if key not in self._rows_of:
            T = tokens_per_row
            if self.uniform is not None:
                groups = [torch.arange(n, device=self.device)]
            else:
                wanted = set(slots)
                groups = [rows for s, rows in self.groups if s in wanted]
                if T > 1:
                    groups = [(rows[:, None] * T + torch.arange(T, device=self.device)).flatten() for rows in groups]
            offsets = torch.tensor([0, *[len(rows) for rows in groups]], device=self.device).cumsum(0)
            self._rows_of[key] = torch.cat(groups), offsets
        return self._rows_of[key]


class MultiLoraLinear(nn.Module):
    """A frozen `nn.Linear`, GPT-2 `Conv1D` or packed `QuantLinear` plus any number of adapters, one per slot, each
    of its own rank. The base weight is read through `base_weight` (a packed one is dequantized per forward)."""

    is_lora_wrapper = True

    def __init__(self, base_layer: nn.Linear | Conv1D | QuantLinear, routing: Routing):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = linear_features(base_layer)
        self.dtype, self.device = _dtype_device(base_layer)
        self.lora_a: dict[int, torch.Tensor] = {}  # slot -> A (r, in), in the base weight's dtype
        self.lora_b: dict[int, torch.Tensor] = {}  # slot -> B (out, r)
        self.lora_s: dict[int, float] = {}  # slot -> the scaling still to apply (1.0 when folded into B)
        # "version": bumped when an adapter changes; `_stacks` for the batch's mix under "key"; the kernel's table
        # under "table" ((version, slots), table). A plain dict: nn.Module's __setattr__ costs ~15 us a call.
        self._state: dict[str, object] = {"version": 0, "key": None, "stack": None, "table": ((), None),
                                          "lane_key": None, "lane_stack": None, "lanes": None}
        self._slot_version: dict[int, int] = {}  # slot -> the layer's version when its adapter was set

    @property
    def weight(self) -> torch.Tensor:  # code that reads a projection's weight (dtype checks) sees the base's
        return base_weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def set_adapter(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Put A (r, in) and B (out, r) with their scaling in `slot` (replacing what was there); other slots are
        not touched. Tensors already in the base's dtype and device are kept as they are (views of the file's one
        buffer: no copy, see `lora.adapter.read_adapter`) and scaled at compute time; others are converted, with
        the scaling folded into B in fp32 first, as the training layer does."""
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a {self.in_features}->"
                             f"{self.out_features} layer")
        dtype, device = self.dtype, self.device
        if a.dtype != dtype or b.dtype != dtype or a.device != device or b.device != device:
            a = a.to(device=device, dtype=dtype)
            b, scaling = (b.to(device=device, dtype=torch.float32) * scaling).to(dtype), 1.0
        self.lora_a[slot], self.lora_b[slot], self.lora_s[slot] = a.contiguous(), b.contiguous(), float(scaling)
        self._state["version"] += 1
        self._slot_version[slot] = self._state["version"]
        self.routing.adapters_version += 1

    def remove_adapter(self, slot: int) -> None:
        if self.lora_a.pop(slot, None) is not None:
            self.lora_b.pop(slot)
            self.lora_s.pop(slot)
            self._state["version"] += 1
            self.routing.adapters_version += 1

    def _delta(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """s · (x Aᵀ) Bᵀ for one adapter, in its dtype: x (..., in) -> (..., out)."""
        a, b, s = self.lora_a[slot], self.lora_b[slot], self.lora_s[slot]
        delta = (x.to(a.dtype) @ a.T) @ b.T
        return delta if s == 1.0 else delta * s

    def adapter_bytes(self, slot: int) -> int:
        """The bytes `slot` holds here: its A and B (the kernel reads them where they are)."""
        if slot not in self.lora_a:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.lora_a[slot], self.lora_b[slot]))

    def _kernel_weight(self, xt: torch.Tensor) -> torch.Tensor | None:
        """The base weight when the C++ kernel is built and can multiply it (a dense fp32 `nn.Linear` on a CPU, an fp32
        bias or none, fp32 input); else None."""
        weight, bias = getattr(self.base_layer, "weight", None), getattr(self.base_layer, "bias", None)
        if (self.fan_in_fan_out or not isinstance(weight, torch.Tensor) or sgmv.kernel_for(weight) is None
                or xt.dtype != torch.float32 or not weight.is_contiguous()
                or (bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()))):
            return None
        return weight

    def _stacks(self, n: int = 0, tokens_per_row: int = 1) -> tuple | None:
        """For the adapters of this batch that this layer has (G of them): ("sgmv", table (4, G), rows grouped by
        adapter, offsets (G+1,)) for the kernel (`_make_table`), or ("masked", A_cat (G·R, in), s·B_cat (out, G·R),
        mask (B, G·R), maskᵀ) for the fallback. None when no row's adapter is here. With every row on one adapter
        (`Routing.uniform`) the kernel's stacks for a batch of `n` rows (the fallback has its own matmul for it);
        with `tokens_per_row` T > 1 (a mixed prefill, the kernel's only), every token a row: row i's are i·T ... ."""
        routing = self.routing
        state = self._state
        version = state["version"]
        key = (routing.version, version, n if routing.uniform is not None else 0, tokens_per_row)
        if key != state["key"]:
            if routing.uniform is not None:
                slots = (routing.uniform,) if routing.uniform in self.lora_a and n else ()
            else:
                slots = tuple(s for s in routing.present if s in self.lora_a)
            stack = None
            if slots:
                if sgmv.kernel_for(self.lora_a[slots[0]]) is not None:  # the adapters are in the layer's dtype
                    if state["table"][0] != (version, slots):  # made again only when the adapters change
                        state["table"] = (version, slots), self._make_table(slots)
                    stack = ("sgmv", state["table"][1], *routing.rows_of(slots, n, tokens_per_row))
                else:
                    stack = self._masked_stacks([(s, rows) for s, rows in routing.groups if s in slots])
            state["key"], state["stack"] = key, stack
        return state["stack"]

    def _make_table(self, slots: tuple[int, ...]) -> torch.Tensor:
        """The kernel's table (4, G): where each adapter's A and B live, its rank and scaling (float64 bits)."""
        return torch.tensor([[self.lora_a[s].data_ptr() for s in slots], [self.lora_b[s].data_ptr() for s in slots],
                             [self.lora_a[s].shape[0] for s in slots],
                             [_float64_bits(self.lora_s[s]) for s in slots]], dtype=torch.long)

    def _lane_stack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The lane kernel's (A (Q/4, in, 4, S), B (out, Q, S), s (S,)) for the adapters holding lanes
        (`Routing.lanes`), or None when none of them adapts this layer. The layer keeps one copy of them, interleaved
        by lane (S = `Routing.lane_count`, Q the largest rank rounded up to 4, zero-padded; both only grow, the lanes
        already copied moved into the larger copy). A lane is copied from its adapter only when another adapter, or
        new weights of its own, take it: a new mix of adapters that already hold lanes copies nothing and costs no
        Python here. A lane whose adapter does not adapt this layer has s = 0 (the kernel then adds exact zeros)."""
        routing, state = self.routing, self._state
        key = (routing.lane_epoch, routing.lane_count, state["version"])
        if state["lane_key"] == key:
            return state["lane_stack"]
        here = {slot: lane for slot, lane in routing.lanes.items() if slot in self.lora_a}
        stack = None
        if here:
            S = routing.lane_count
            Q = -(-max(self.lora_a[s].shape[0] for s in here) // 4) * 4
            held = state["lanes"]
            if held is None or held["b"].shape[2] < S or held["b"].shape[1] < Q:
                old = held
                Q = max(Q, 0 if old is None else old["b"].shape[1])
                held = state["lanes"] = {"a": torch.zeros(Q // 4, self.in_features, 4, S, dtype=torch.float32),
                                         "b": torch.zeros(self.out_features, Q, S, dtype=torch.float32),
                                         "in": {} if old is None else old["in"]}
                if old is not None:  # the lanes already copied keep their place
                    q_old, s_old = old["b"].shape[1:]
                    held["a"][:q_old // 4, :, :, :s_old] = old["a"]
                    held["b"][:, :q_old, :s_old] = old["b"]
            Q = held["b"].shape[1]
            scales = torch.zeros(S, dtype=torch.float32)
            for slot, lane in here.items():
                scales[lane] = self.lora_s[slot]
                if held["in"].get(lane) == (slot, self._slot_version[slot]):
                    continue
                a, b = self.lora_a[slot], self.lora_b[slot]
                r = a.shape[0]
                padded_a = a.new_zeros(Q, self.in_features)
                padded_a[:r] = a
                held["a"][..., lane] = padded_a.view(Q // 4, 4, -1).transpose(1, 2)
                held["b"][:, :r, lane] = b
                held["b"][:, r:, lane] = 0
                held["in"][lane] = (slot, self._slot_version[slot])
            stack = held["a"], held["b"], scales
        state["lane_key"], state["lane_stack"] = key, stack
        return stack

    def _masked_stacks(self, groups: list[tuple[int, torch.Tensor]]) -> tuple:
        a_cat = torch.cat([self.lora_a[s] for s, _ in groups])  # (G·R, in)
        b_cat = torch.cat([self.lora_b[s] * self.lora_s[s] for s, _ in groups], dim=1)  # (out, G·R), scaled
        mask = a_cat.new_zeros(len(self.routing.rows), a_cat.shape[0])  # (B, G·R)
        start = 0
        for s, rows in groups:  # each group's rows, as Routing found them
            r = self.lora_a[s].shape[0]
            mask[rows, start:start + r] = 1
            start += r
        return "masked", a_cat, b_cat, mask, mask.T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        if routing.small_batch_kernel and not self.fan_in_fan_out:
            rows = x.shape[:-1].numel()
            if rows <= SMALL_BATCH_ROWS or (rows <= KERNEL_ROWS and self._kernel_weight(x) is not None):
                return self._forward_few_rows(x)
        result = self.base_layer(x)  # (B, T, out)
        if routing.uniform is not None:  # one adapter for the whole batch: the plain LoRA forward
            if routing.uniform not in self.lora_a:
                return result
            return result + self._delta(routing.uniform, x).to(result.dtype)
        if routing.rows is None or not self.lora_a:
            return result
        if x.shape[1] == 1:  # decode: each row's own adapter, on the (out, B) and (in, B) transposed views
            add_mixed_t([(self, result[:, 0].T)], x[:, 0].to(self.dtype).T)
            return result
        return self._add_prefill(result, x)  # prefill: each adapter on its own rows

    def _forward_few_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum for a few rows (tokens), computed transposed (`project_t`). With the tokens as the short
        dimension the kernel (or MKL) runs faster on this machine's AVX2 cores than x Wᵀ (bench/RESULTS.md, "decode
        kernels"); equal up to float rounding. A mixed prefill's tokens each take their row's adapter."""
        lead = x.shape[:-1]  # (B, T), or (tokens,) where a model flattens them (an MoE's shared expert)
        rows = self.routing.rows
        T = x.shape[1] if x.dim() == 3 else 1
        if x.dim() == 2 and rows is not None and x.shape[0] != len(rows):  # a mixed batch's (B·T) tokens, row by row
            if x.shape[0] % len(rows):
                raise ValueError(f"{x.shape[0]} tokens do not split into the mixed batch's {len(rows)} rows")
            T = x.shape[0] // len(rows)
        xt = x.reshape(-1, x.shape[-1]).T
        mixed_prefill = rows is not None and T > 1
        fused = mixed_prefill and self._kernel_weight(xt) is not None
        yt = project_t([self], xt, with_lora=fused or not mixed_prefill, tokens_per_row=T, row_major=True)[0]
        y = yt.T.contiguous().view(*lead, yt.shape[0])  # row-major (the kernel wrote it so: no copy)
        if mixed_prefill and not fused:  # adapters on their rows' tokens, after the base
            y = self._add_prefill(y.view(len(rows), T, -1), x.view(len(rows), T, -1)).view(*lead, -1)
        return y

    def _add_prefill(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result` (B, T, out) plus each row's adapter on its T tokens (a mixed prefill whose base was computed
        elsewhere). Up to `KERNEL_TOKENS_PER_ADAPTER` tokens per adapter present: the kernel's adapters-only form with
        every token a row, one call a layer; more: a matmul pair per adapter on its rows, where MKL's speed on long
        prompts outweighs the Python calls."""
        stacks = self._stacks()
        if stacks is None:
            return result
        B, T = x.shape[:2]
        if stacks[0] != "sgmv" or B * T > KERNEL_TOKENS_PER_ADAPTER * stacks[1].shape[1]:
            return self._add_groups(result, x)
        _, table, rows, offsets = stacks
        tokens = (rows[:, None] * T + torch.arange(T, device=rows.device)).flatten()  # each row's T tokens, in order
        result = result.contiguous()  # (a no-op for the base layers here)
        flat = result.view(B * T, -1)  # a view: the kernel adds into `result`
        sgmv.kernel().linear_t_([flat.T], x.reshape(B * T, -1).to(self.dtype).T, [None], [None], [table], [tokens],
                                [offsets * T])
        return result

    def _add_groups(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result` plus each present adapter's delta on its own rows (a mixed batch of many tokens per row)."""
        for slot, rows in self.routing.groups:
            if slot in self.lora_a:
                result = result.index_add(0, rows, self._delta(slot, x[rows]).to(result.dtype))  # (n, T, out)
        return result

    def forward_t(self, xt: torch.Tensor, with_lora: bool = True) -> torch.Tensor:
        """yᵀ = W xᵀ + b (+ s·B A xᵀ for the batch's one adapter, or each row's own adapter for a mixed batch of one
        token per row): xt (in, N) -> (out, N), N the rows. The decode step keeps activations this way."""
        return project_t([self], xt, with_lora)[0]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={sorted(self.lora_a)}"


NO_ADAPTERS = ("sgmv", torch.zeros((4, 0), dtype=torch.long), torch.zeros(0, dtype=torch.long),
               torch.zeros(1, dtype=torch.long))
"""The kernel's stacks for a layer none of whose adapters is in the batch: its base alone."""


def project_t(layers: list[MultiLoraLinear] | tuple[MultiLoraLinear, ...], xt: torch.Tensor,
              with_lora: bool = True, tokens_per_row: int = 1, row_major: bool = False) -> list[torch.Tensor]:
    """[yᵀ = W xᵀ + b + each row's adapter for each layer], the layers sharing their input xt (in, N) (q, k and v;
    gate and up). Where the C++ kernel serves (dense fp32 weights on a CPU) all of them are one call: the base and
    every row's own adapter in one pass over each weight (`csrc/sgmv.cpp`); a mixed batch's rows may hold
    `tokens_per_row` tokens each (a prefill), each a column of xt. Otherwise torch's matmul for the base, and the
    adapters of a mixed batch of one token per row in one kernel call for all the layers (or the stacked fallback).
    `row_major`: the kernel writes each yᵀ as the transpose of a contiguous (N, out), for a caller that wants y."""
    routing = layers[0].routing
    weights = [layer._kernel_weight(xt) for layer in layers]
    n = xt.shape[1]
    if all(w is not None for w in weights):
        kernel = sgmv.kernel()
        biases = [layer.base_layer.bias for layer in layers]
        ys = [xt.new_empty(n, layer.out_features).T if row_major else xt.new_empty(layer.out_features, n)
              for layer in layers]
        if with_lora and routing.row_lanes is not None:  # a mix of many adapters
            kernel.linear_lanes_(ys, xt, weights, biases, *_lane_args(layers), routing.lanes_of_tokens(tokens_per_row))
            return ys
        lora = with_lora and (routing.rows is not None or routing.uniform is not None)
        stacks = [(layer._stacks(n, tokens_per_row) if lora else None) or NO_ADAPTERS for layer in layers]
        kernel.linear_t_(ys, xt, weights, biases, *[[s[i] for s in stacks] for i in (1, 2, 3)])
        return ys
    ys = []
    for layer in layers:
        yt = torch.mm(base_weight(layer.base_layer, xt.dtype), xt)  # (out, N), a new tensor: the sums go into it
        slot = routing.uniform
        if with_lora and slot is not None and slot in layer.lora_a:
            yt.addmm_(layer.lora_b[slot], torch.mm(layer.lora_a[slot], xt.to(layer.dtype)), alpha=layer.lora_s[slot])
        if layer.base_layer.bias is not None:
            yt.add_(layer.base_layer.bias[:, None])
        ys.append(yt)
    if with_lora and routing.rows is not None:
        assert tokens_per_row == 1, "a mixed prefill without the kernel goes through MultiLoraLinear._add_prefill"
        add_mixed_t(list(zip(layers, ys)), xt)
    return ys


def _lane_args(layers) -> tuple[list, list, list]:
    """The lane kernel's ([A], [B], [s]) for layers sharing an input (None for a layer no adapter in a lane adapts),
    kept on the first layer until the lanes or an adapter change: ~120 calls a decode step."""
    state, routing = layers[0]._state, layers[0].routing
    key = (routing.lane_epoch, routing.lane_count, routing.adapters_version, len(layers))
    cached = state.get("lane_args")
    if cached is None or cached[0] != key or cached[1] is not layers[-1]:  # (q, k, v) and q alone share a first
        stacks = [layer._lane_stack() or (None, None, None) for layer in layers]
        cached = state["lane_args"] = key, layers[-1], tuple([stack[i] for stack in stacks] for i in range(3))
    return cached[2]


def add_mixed_t(pairs: list[tuple[MultiLoraLinear, torch.Tensor]], xt: torch.Tensor) -> None:
    """yt (out, N) += each row's own adapter update on xt (in, N), in place, for each (layer, yt) of a mixed batch of
    one token per row. Strided views work: a row-major batch passes its (out, B) and (in, B) transposes."""
    kernel_args: list[list[torch.Tensor]] = [[], [], [], []]  # ys, tables, rows, offsets
    for layer, yt in pairs:
        stacks = layer._stacks()
        if stacks is None:
            continue
        if stacks[0] == "sgmv":
            for column, t in zip(kernel_args, (yt, *stacks[1:])):
                column.append(t)
        else:
            _, a_cat, b_cat, _, mask_t = stacks
            yt.addmm_(b_cat, torch.mm(a_cat, xt).mul_(mask_t))
    if kernel_args[0]:
        ys, tables, rows, offsets = kernel_args
        none = [None] * len(ys)
        sgmv.kernel().linear_t_(ys, xt, none, none, tables, rows, offsets)


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _dtype_device(base_layer: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device a served layer computes in (a packed base: its compute dtype)."""
    if isinstance(base_layer, QuantLinear):
        return base_layer.dtype, base_layer.device
    return base_layer.weight.dtype, base_layer.weight.device


class MultiSaved(nn.Module):
    """A module each adapter trains in full (a classifier head, PEFT's modules_to_save): one copy per slot; a row
    runs its adapter's copy, a base row the original."""

    is_lora_wrapper = True

    def __init__(self, original: nn.Module, routing: Routing):
        super().__init__()
        self.original_module = original
        self.routing = routing
        self.copies = nn.ModuleDict()  # str(slot) -> module

    def set_adapter(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        module = copy.deepcopy(self.original_module)
        expected = dict(module.named_parameters())
        if set(state) != set(expected):
            raise ValueError(f"parameters {sorted(state)} do not match the module's {sorted(expected)}")
        with torch.no_grad():
            for name, p in expected.items():
                if state[name].shape != p.shape:
                    raise ValueError(f"{name}: shape {tuple(state[name].shape)} in the file, {tuple(p.shape)} here")
                p.copy_(state[name].to(p.dtype))
        self.copies[str(slot)] = module

    def remove_adapter(self, slot: int) -> None:
        self.copies.pop(str(slot), None)

    def adapter_bytes(self, slot: int) -> int:
        module = self.copies[str(slot)] if str(slot) in self.copies else None
        return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.routing
        if routing.rows is None:  # the base, or one adapter for every row
            return self._module(-1 if routing.uniform is None else routing.uniform)(x, *args, **kwargs)
        out = None
        for slot in [-1, *routing.present]:
            rows = (routing.rows == slot).nonzero().flatten()
            if len(rows) == 0:
                continue
            y = self._module(slot)(x[rows], *args, **kwargs)
            out = y.new_zeros((len(routing.rows), *y.shape[1:])) if out is None else out
            out[rows] = y
        return out

    def _module(self, slot: int) -> nn.Module:
        return self.copies[str(slot)] if str(slot) in self.copies else self.original_module


def scaling_of(config, path: str) -> tuple[int, float]:
    """(r, scaling) of module `path` under `config`, rank/alpha patterns and rsLoRA included."""
    r, alpha = config.rank_and_alpha(path)
    return r, lora_scaling(r, alpha, config.use_rslora)


class MultiLoraModel:
    """A transformers model serving any number of named adapters at once (a handle, like `LoraModel`).

    A layer is wrapped when the first adapter that targets it arrives, or, with `wrap_all` (a decoder served by the
    engine), every Linear/Conv1D up front but classifier heads, so base-only rows get the engine's few-row kernel
    too. Adding, replacing and removing an adapter touch only its own slot.
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", *, wrap_all: bool = False):
        check_no_lora(model)
        self.model = model
        self.routing = Routing(device)
        self.slots: dict[str, int] = {}
        self.layers: dict[str, MultiLoraLinear] = {}
        self.saved: dict[str, MultiSaved] = {}
        self._owned: dict[str, list[str]] = {}  # adapter name -> the layer and saved-module paths it occupies
        if wrap_all:
            for path in [p for p, m in model.named_modules() if isinstance(m, SERVED)
                         and not set(p.split(".")) & set(CLASSIFIER_HEAD_NAMES)]:
                self._layer(path)

    def add(self, name: str, weights) -> int:
        """Put adapter `weights` (an `AdapterWeights`) in a slot under `name`, replacing one of that name; its slot."""
        lora, saved = self._plan(weights)  # every check before anything changes
        slot = self.slots.get(name)
        if slot is None:
            slot = min(set(range(len(self.slots) + 1)) - set(self.slots.values()))
        for path in self._owned.get(name, []):  # what the old adapter of this name had and the new one lacks
            if path not in lora and path not in saved:
                (self.layers.get(path) or self.saved[path]).remove_adapter(slot)
        for path, (a, b, scaling) in lora.items():
            self._layer(path).set_adapter(slot, a, b, scaling)
        for path, state in saved.items():
            self._saved(path).set_adapter(slot, state)
        self.slots[name] = slot
        self._owned[name] = [*lora, *saved]
        self.routing.set(None)  # the batch's stacks are rebuilt on the next routed forward
        return slot

    def remove(self, name: str) -> None:
        slot = self.slots.pop(name)
        for path in self._owned.pop(name):
            (self.layers.get(path) or self.saved[path]).remove_adapter(slot)
        self.routing.set(None)

    def bytes_needed(self, weights) -> int:
        """The bytes adapter `weights` (an `AdapterWeights`) will hold once added, as `adapter_bytes` counts them
        (in each layer's dtype): what a store's memory cap must make room for."""
        total = 0
        for key, t in weights.tensors.items():
            path = key.rsplit(".", 2)[0]
            dtype = t.dtype  # a saved module (or a key `add` will refuse): as read
            if key.endswith((".lora_A.weight", ".lora_B.weight")):
                if path in self.layers:
                    dtype = self.layers[path].dtype
                elif isinstance(module := self._find(path), SERVED):
                    dtype = _dtype_device(module)[0]
            total += t.numel() * dtype.itemsize
        return total

    def _find(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def lane_bytes(self) -> int:
        """The bytes of the lane kernel's copies (`MultiLoraLinear._lane_stack`), over every layer: what serving
        mixes of `LANES_MIN` or more adapters holds beside the resident adapters."""
        held = [layer._state["lanes"] for layer in self.layers.values() if layer._state["lanes"] is not None]
        return sum(t.numel() * t.element_size() for lanes in held for t in (lanes["a"], lanes["b"]))

    def adapter_bytes(self, name: str) -> int:
        slot = self.slots[name]
        return sum((self.layers.get(p) or self.saved[p]).adapter_bytes(slot) for p in self._owned[name])

    def route(self, names: list[str | None] | None) -> None:
        """Row i of the next forwards uses adapter `names[i]` (None: the base); `names=None`: all on the base."""
        self.routing.set(None if names is None else [None if n is None else self.slots[n] for n in names])

    # ---- checks: a file that does not fit this model is refused before anything changes ------------------------
    def _plan(self, weights) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, dict]]:
        config, where = weights.config, f"adapter {weights.source} (made for {weights.config.base_model_name_or_path})"
        config.check_on_original_base(where)
        if config.use_dora:
            raise LoraforgeError(f"{where} is a DoRA adapter: mixed-batch serving supports plain LoRA only. Merge it "
                                 "(loraforge merge) and serve the merged model, or train without use_dora")
        if config.bias != "none":
            raise LoraforgeError(f"{where} trains biases (bias={config.bias!r}), which would change the base for "
                                 "every user of it; serve it merged (loraforge merge) instead")
        lora_keys = {k for k in weights.tensors if k.endswith((".lora_A.weight", ".lora_B.weight"))}
        if any(".lora_embedding_" in k or k.endswith(".lora_magnitude_vector") for k in weights.tensors):
            raise LoraforgeError(f"{where} adapts an embedding layer; mixed-batch serving supports Linear and Conv1D "
                                 "targets. Merge it (loraforge merge) and serve the merged model")
        lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for key in sorted(lora_keys):
            path = key.rsplit(".", 2)[0]
            if path in lora:
                continue
            a, b = weights.tensors.get(f"{path}.lora_A.weight"), weights.tensors.get(f"{path}.lora_B.weight")
            if a is None or b is None:
                raise LoraforgeError(f"{where}: {path} has only one of lora_A/lora_B; the file is incomplete")
            base = self._base_module(path, where)
            in_f, out_f = linear_features(base)
            r, scaling = scaling_of(config, path)
            if a.shape != (r, in_f) or b.shape != (out_f, r):
                raise LoraforgeError(
                    f"{where}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but this base needs "
                    f"({r}, {in_f}) and ({out_f}, {r}) for r={r}: it was made for another base model or rank")
            lora[path] = (a, b, scaling)
        tensors = [t for pair in lora.values() for t in pair[:2]]
        norms = torch.stack(torch._foreach_norm(tensors)) if tensors else torch.zeros(0)  # one pass over all weights
        if not bool(norms.isfinite().all()):
            bad = next(path for path, (a, b, _) in lora.items() if not (a.isfinite().all() and b.isfinite().all()))
            raise LoraforgeError(f"{where}: {bad} holds NaN/inf weights; the adapter is broken")
        saved = self._saved_plan(weights, set(weights.tensors) - lora_keys, where)
        if not lora and not saved:
            raise LoraforgeError(f"{where}: the file holds no LoRA weights")
        return lora, saved

    def _saved_plan(self, weights, keys: set[str], where: str) -> dict[str, dict[str, torch.Tensor]]:
        names = list(weights.config.modules_to_save or [])
        if weights.config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
            names += list(CLASSIFIER_HEAD_NAMES)
        saved: dict[str, dict[str, torch.Tensor]] = {}
        for key in sorted(keys):
            path = next((p for p in self._module_paths() if key.startswith(p + ".")
                         and any(p == n or p.endswith("." + n) for n in names)), None)
            if path is None:
                raise LoraforgeError(f"{where}: key {key!r} has no place in this model: it was made for another "
                                     "architecture, or the file is corrupt")
            saved.setdefault(path, {})[key[len(path) + 1:]] = weights.tensors[key]
        for path, state in saved.items():
            module = self.saved[path].original_module if path in self.saved else self.model.get_submodule(path)
            expected = {n: p.shape for n, p in module.named_parameters()}
            got = {n: t.shape for n, t in state.items()}
            if expected != got:
                raise LoraforgeError(f"{where}: {path} has parameters {got} in the file but {expected} in this model "
                                     "(a head for another number of labels, or another base)")
        return saved

    def _module_paths(self) -> list[str]:
        paths = [p for p, _ in self.model.named_modules() if p and ".original_module" not in p
                 and ".copies." not in p and not p.endswith(".base_layer")]
        return [p[:-len(".original_module")] if p.endswith(".original_module") else p for p in paths]

    def _base_module(self, path: str, where: str) -> nn.Module:
        if path in self.layers:
            return self.layers[path].base_layer
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise LoraforgeError(f"{where}: this base has no module {path}: the adapter was made for another "
                                 f"architecture ({type(self.model).__name__} here)") from None
        if not isinstance(module, SERVED):
            raise LoraforgeError(f"{where}: {path} is a {type(module).__name__} here; mixed-batch serving adapts "
                                 "Linear and Conv1D layers")
        return module

    def _layer(self, path: str) -> MultiLoraLinear:
        if path not in self.layers:
            self.layers[path] = MultiLoraLinear(self.model.get_submodule(path), self.routing)
            replace_module(self.model, path, self.layers[path])
        return self.layers[path]

    def _saved(self, path: str) -> MultiSaved:
        if path not in self.saved:
            self.saved[path] = MultiSaved(self.model.get_submodule(path), self.routing)
            replace_module(self.model, path, self.saved[path])
        return self.saved[path]


