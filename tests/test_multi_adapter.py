"""Many adapters on one base (lora/multi.py): each row of a mixed batch equals its adapter alone, base rows equal
the base bit for bit, adapters come and go without touching the others, and what cannot be served is refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures.tiny_models import tiny_tokenizer
from helpers import session_of, tiny_gpt2, tiny_llama, token_ids
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter, sgmv
from loraforge.lora.adapter import read_adapter
from loraforge.lora.multi import MultiLoraModel
from tolerances import FP32, max_abs_diff

pytestmark = pytest.mark.usefixtures("one_thread")

# Three adapters per architecture, each different in rank, alpha, rsLoRA, targets or patterns.
CONFIGS = {
    "llama": [dict(r=2, lora_alpha=4, target_modules="all-linear"),
              dict(r=4, lora_alpha=3, target_modules=["q_proj", "v_proj"], use_rslora=True),
              dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj", "down_proj"],
                   rank_pattern={"down_proj": 5}, alpha_pattern={"o_proj": 1.5})],
    "gpt2": [dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
             dict(r=4, lora_alpha=3, target_modules=["c_attn", "c_proj"], use_rslora=True),
             dict(r=3, lora_alpha=6, target_modules=["c_fc"])],
}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def adapters(request, tmp_path_factory):
    """(builder, {name: folder}) for three non-trivial adapters on the same tiny base."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"adapters_{kind}")
    folders = {}
    for k, options in enumerate(CONFIGS[kind]):
        torch.manual_seed(100 + k)
        lm = LoraModel(BUILDERS[kind](), LoraConfig(init_lora_weights=False, **options))
        folders[f"a{k}"] = save_adapter(lm, root / f"a{k}")
    return BUILDERS[kind], folders


def _alone(builder, folder, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the training layer with one adapter (or the plain base for folder None)."""
    model = builder()
    if folder is not None:
        load_adapter(model, folder)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _served(builder, folders, wrap_all: bool = False) -> MultiLoraModel:
    multi = MultiLoraModel(builder(), wrap_all=wrap_all)
    for name, folder in folders.items():
        multi.add(name, read_adapter(folder))
    return multi


@pytest.mark.parametrize("length", [7, 1])  # prefill (a grouped matmul per adapter) and decode (the mixed kernel)
@pytest.mark.parametrize("few_rows", [False, True])  # x Wᵀ, or the engine's W xᵀ kernel for a few rows
@pytest.mark.parametrize("kernel", ["sgmv", "masked"])  # the C++ kernel, or the fallback where it cannot be built
def test_each_row_equals_its_adapter_alone(adapters, length, few_rows, kernel, monkeypatch):
    monkeypatch.setenv("LORAFORGE_KERNELS", "1" if kernel == "sgmv" else "0")
    builder, folders = adapters
    multi = _served(builder, folders, wrap_all=few_rows)
    multi.routing.small_batch_kernel = few_rows
    names = ["a0", None, "a2", "a1", "a2", None]
    ids = token_ids(len(names), length, seed=4)
    multi.route(names)
    with torch.no_grad():
        mixed = multi.model(input_ids=ids).logits  # (6, T, V)
        if length == 1:
            stacks = [layer._state["stack"] for layer in multi.layers.values()]
            assert all(stack[0] == kernel for stack in stacks if stack is not None)
        multi.route(None)
        base_same_batch = multi.model(input_ids=ids).logits  # the same layers, no adapter anywhere
    assert max_abs_diff(base_same_batch, _alone(builder, None, ids)) <= FP32
    for i, name in enumerate(names):
        if name is None:  # the base row: what the base computes on the same batch, bit for bit
            assert torch.equal(mixed[i], base_same_batch[i])
        else:
            alone = _alone(builder, folders[name], ids[i:i + 1])[0]
            assert max_abs_diff(mixed[i], alone) <= FP32
            assert max_abs_diff(mixed[i], base_same_batch[i]) > 100 * FP32  # the adapter did something


LANE_CONFIGS = [dict(r=1 + k % 7, lora_alpha=2 + k, use_rslora=k % 3 == 0,
                     target_modules="all-linear" if k % 2 == 0 else ["q_proj", "v_proj", "down_proj"])
                for k in range(10)]


def test_a_mix_of_many_adapters_takes_the_lane_kernel(tmp_path):
    """Ten adapters (ranks 1-7, some on three layers only) on 21 rows of one token (two panels of 16, two groups of 8
    lanes, rows out of lane order, base rows) and of three (a prefill): each row equals its adapter alone, a base
    row the base bit for bit.
    The next mix keeps the lanes of the adapters that stay (copying nothing for them), takes an adapter's new
    weights, and is again each adapter alone."""
    assert sgmv.kernel() is not None, "the C++ kernel did not build here (see the warning above): a compiler is required"
    folders = {}
    for k, options in enumerate(LANE_CONFIGS):
        torch.manual_seed(200 + k)
        folders[f"u{k}"] = save_adapter(LoraModel(tiny_llama(), LoraConfig(init_lora_weights=False, **options)),
                                        tmp_path / f"u{k}")
    multi = _served(tiny_llama, folders, wrap_all=True)
    multi.routing.small_batch_kernel = True
    layer = multi.layers["model.layers.0.self_attn.q_proj"]
    mixes = [[f"u{(7 * i) % 10}" if i not in (2, 11, 20) else None for i in range(21)],
             [None, "u4", "u9", "u2", "u2", "u0", None, "u6", "u9"]]

    def check(names, served, length):
        ids = token_ids(len(names), length, seed=len(names))
        multi.route(names)
        with torch.no_grad():
            mixed = multi.model(input_ids=ids).logits
            assert multi.routing.row_lanes is not None and layer._state["lane_stack"] is not None
            routing = multi.routing
            assert layer._state["lane_key"] == (routing.lane_epoch, routing.lane_count, layer._state["version"])
            multi.route(None)
            base = multi.model(input_ids=ids).logits
        for i, name in enumerate(names):
            if name is None:
                assert torch.equal(mixed[i], base[i])
            else:
                alone = _alone(tiny_llama, served[name], ids[i:i + 1])[0]
                assert max_abs_diff(mixed[i], alone) <= FP32
                assert max_abs_diff(mixed[i], base[i]) > 100 * FP32

    for length in (1, 3):  # a decode step; a prefill, every token a row on its row's lane (63 tokens, four panels)
        check(mixes[0], folders, length)
    assert multi.routing.lane_count == 16
    lanes_before = dict(multi.routing.lanes)
    held_before = dict(layer._state["lanes"]["in"])
    multi.add("u2", read_adapter(folders["u5"]))  # new weights in u2's slot
    check(mixes[1], {**folders, "u2": folders["u5"]}, 1)
    assert multi.routing.lane_count == 16 and layer._state["lanes"]["b"].shape[2] == 16  # the lanes never shrink
    for name in ("u0", "u4", "u6"):  # lanes below 8 that stay present: kept, not copied again
        slot = multi.slots[name]
        if lanes_before[slot] < 8:
            assert multi.routing.lanes[slot] == lanes_before[slot]
            assert layer._state["lanes"]["in"][lanes_before[slot]] == held_before[lanes_before[slot]]
    assert multi.routing.lanes[multi.slots["u9"]] < 8  # moved down: the mix reads one group of 8 lanes
    epoch, held = multi.routing.lane_epoch, dict(layer._state["lanes"]["in"])
    check(mixes[1][::-1], {**folders, "u2": folders["u5"]}, 1)  # the same adapters on other rows: nothing copied
    assert multi.routing.lane_epoch == epoch and layer._state["lanes"]["in"] == held
    # eight adapters with the rows in lane order, 16 rows (the bench's case: no permute)
    served = {**folders, "u2": folders["u5"]}
    eight = ["u0", "u2", "u4", "u6", "u9", "u1", "u3", "u7"]
    multi.route(eight)
    by_lane = sorted(eight, key=lambda n: multi.routing.lanes[multi.slots[n]])
    assert [multi.routing.lanes[multi.slots[n]] for n in by_lane] == list(range(8))
    check(by_lane * 2, served, 1)
    # u5 (q, v and down_proj only) takes all-linear u0's lane, the copy's size unchanged: the layers u5 does not
    # adapt keep u0's weights in that lane, and its rows must get nothing from them
    u0_lane = multi.routing.lanes[multi.slots["u0"]]
    check(["u5", "u2", "u4", "u6", "u9", "u1", "u3", "u7", None, "u5"], served, 1)
    assert multi.routing.lanes[multi.slots["u5"]] == u0_lane and multi.routing.lane_count == 16
    # a model that flattens its tokens (an MoE's shared expert): (rows x 2 tokens, in), each row's on its adapter;
    # five adapters (the lane kernel) and two (the address table)
    up = multi.layers["model.layers.0.mlp.up_proj"]
    for names in (["u1", "u4", None, "u9", "u0", "u6"], ["u0", None, "u4"]):
        multi.route(names)
        x = torch.randn(2 * len(names), up.in_features)
        with torch.no_grad():
            got = up(x)
            want = up.base_layer(x)
            for i, name in enumerate(names):
                if name is not None and multi.slots[name] in up.lora_a:
                    want[2 * i:2 * i + 2] += up._delta(multi.slots[name], x[2 * i:2 * i + 2])
        assert (multi.routing.row_lanes is not None) == (len(names) > 3)
        assert max_abs_diff(got, want) <= FP32 and max_abs_diff(got, up.base_layer(x)) > 100 * FP32


def _kernel_layer(n_in: int, n_out: int, ranks: list[int], scalings: list[float], groups: list[list[int]]):
    """One layer's kernel arguments (table, rows, offsets), the tensors the table points into, and the closed form."""
    A = [torch.randn(r, n_in) for r in ranks]
    B = [torch.randn(n_out, r) for r in ranks]
    table = torch.tensor([[a.data_ptr() for a in A], [b.data_ptr() for b in B], ranks])
    table = torch.cat([table, torch.tensor([scalings], dtype=torch.float64).view(torch.long)])
    rows = torch.tensor([i for group in groups for i in group], dtype=torch.long)
    offsets = torch.tensor([0, *[len(group) for group in groups]]).cumsum(0)

    def closed_form(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x (N, in), y (N, out) row-major
        y = y.clone()
        for g, group in enumerate(groups):
            for i in group:
                y[i] += scalings[g] * (B[g] @ (A[g] @ x[i]))
        return y

    return (table, rows, offsets), (A, B), closed_form


@pytest.mark.parametrize("N", [9, 37])  # one panel of rows (16); three, the last partial, one adapter's 12 rows in two
def test_kernel_against_the_closed_form(N):
    """y_l = W_l x + b_l + s·B_k A_k x for each row's own adapter k and each layer l sharing x, written whole; or
    only the adapters' part added into y_l (no W); on strided views (a row-major batch's transposes) and the decode
    step's layout; groups of 1-12 rows, each adapter at its own rank (2-19: whole and partial 8-wide lanes), 135 and 64
    outputs (partial tiles of 3 and 4 of 6); rows in no group are the base alone (bit for bit in the adding form:
    untouched)."""
    kernel = sgmv.kernel()
    assert kernel is not None, "the C++ kernel did not build here (see the warning above): a compiler is required"
    torch.manual_seed(0)
    n_in = 37
    groups1 = [[4], [0, 7, 2], [5, N - 1]] + ([[20, 11, 36, 17], list(range(21, 33))] if N > 20 else [])
    first, _held1, first_form = _kernel_layer(n_in, 135, [2, 16, 19, 8, 5][:len(groups1)],  # 8-wide lanes and tails
                                              [2.0, 0.7, 1.5, 0.3, 1.1][:len(groups1)], groups1)
    second, _held2, second_form = _kernel_layer(n_in, 64, [4], [0.5], [[1, 3, N - 1]])  # another layer's adapters
    x, y1, y2 = 0.2 * torch.randn(N, n_in), torch.randn(N, 135), torch.randn(N, 64)  # updates of order 1
    want1, want2 = first_form(x, y1), second_form(x, y2)
    before1 = y1.clone()
    kernel.linear_t_([y1.T, y2.T], x.T, [None, None], [None, None], *[list(pair) for pair in zip(first, second)])
    assert max_abs_diff(y1, want1) <= FP32 and max_abs_diff(y2, want2) <= FP32
    assert torch.equal(y1[[1, 3, 6]], before1[[1, 3, 6]])  # the first layer's base rows
    yt = before1.T.contiguous()  # the decode step's transposed, contiguous layout, one layer
    kernel.linear_t_([yt], x.T.contiguous(), [None], [None], *[[t] for t in first])
    assert max_abs_diff(yt.T, want1) <= FP32
    W1, b1, W2 = torch.randn(135, n_in), torch.randn(135), torch.randn(64, n_in)  # the base matmul in the same pass
    outs = [torch.full((135, N), float("nan")), torch.full((64, N), float("nan"))]  # every element is written
    kernel.linear_t_(outs, x.T, [W1, W2], [b1, None], *[list(pair) for pair in zip(first, second)])
    base1, base2 = x @ W1.T + b1, x @ W2.T
    assert max_abs_diff(outs[0].T, first_form(x, base1)) <= FP32
    assert max_abs_diff(outs[1].T, second_form(x, base2)) <= FP32
    empty = (torch.zeros((4, 0), dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    alone = torch.empty(135, N)
    kernel.linear_t_([alone], x.T.contiguous(), [W1], [b1], *[[t] for t in empty])  # no adapter: the base alone
    assert max_abs_diff(alone.T, base1) <= FP32
    assert torch.equal(alone[:, [1, 3, 6]], outs[0][:, [1, 3, 6]])  # base rows of the mixed call, bit for bit


@pytest.mark.parametrize("few_rows", [False, True])  # x Wᵀ, or the engine's W xᵀ kernel (every token a row)
def test_one_adapter_for_the_whole_batch_and_no_adapter(adapters, few_rows):
    builder, folders = adapters
    multi = _served(builder, folders, wrap_all=few_rows)
    multi.routing.small_batch_kernel = few_rows
    ids = token_ids(3, 5, seed=2)
    multi.route(["a1"])  # one name: every row, whatever the batch size (beam search widens it)
    with torch.no_grad():
        uniform = multi.model(input_ids=ids).logits
    assert max_abs_diff(uniform, _alone(builder, folders["a1"], ids)) <= FP32
    multi.route(None)
    with torch.no_grad():
        base = multi.model(input_ids=ids).logits
    if few_rows:  # the kernel's own sums: equal up to float rounding
        assert max_abs_diff(base, _alone(builder, None, ids)) <= FP32
    else:  # no adapter in the batch: the base layers' own forward, bit for bit
        assert torch.equal(base, _alone(builder, None, ids))


def test_few_row_path_takes_flattened_tokens(tmp_path):
    """A layer given (tokens, hidden), as a mixture-of-experts' shared expert is, in the engine's few-row mode."""
    torch.manual_seed(7)
    folder = save_adapter(LoraModel(tiny_llama(), LoraConfig(init_lora_weights=False, **CONFIGS["llama"][0])),
                          tmp_path / "a0")
    multi = _served(tiny_llama, {"a0": folder}, wrap_all=True)
    multi.routing.small_batch_kernel = True
    layer = multi.layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(5, layer.in_features)
    multi.route(["a0"])
    with torch.no_grad():
        got, want = layer(x), layer.base_layer(x) + layer._delta(0, x)
    assert got.shape == (5, layer.out_features) and max_abs_diff(got, want) <= FP32


def test_adding_and_removing_leaves_the_others_unchanged(adapters):
    builder, folders = adapters
    multi = _served(builder, {"a0": folders["a0"], "a1": folders["a1"]})
    names = ["a0", "a1", None]
    ids = token_ids(3, 1, seed=5)

    def logits():
        multi.route(names)
        with torch.no_grad():
            return multi.model(input_ids=ids).logits

    before = logits()
    slot = multi.add("a2", read_adapter(folders["a2"]))
    assert slot == 2
    assert torch.equal(logits(), before)  # a2 is resident but no row uses it: nothing moved
    names[2] = "a2"
    with_a2 = logits()
    assert torch.equal(with_a2[:2], before[:2]) or max_abs_diff(with_a2[:2], before[:2]) <= FP32
    multi.remove("a1")
    names[1] = None
    after = logits()
    assert max_abs_diff(after[0], before[0]) <= FP32 and max_abs_diff(after[2], with_a2[2]) <= FP32
    assert multi.add("a1", read_adapter(folders["a1"])) == 1  # the freed slot is reused


def test_replacing_an_adapter_serves_the_new_weights(adapters):
    builder, folders = adapters
    multi = _served(builder, {"x": folders["a0"], "y": folders["a1"]})
    multi.add("x", read_adapter(folders["a2"]))  # same name, other targets and rank
    ids = token_ids(2, 4, seed=6)
    multi.route(["x", "y"])
    with torch.no_grad():
        mixed = multi.model(input_ids=ids).logits
    assert max_abs_diff(mixed[0], _alone(builder, folders["a2"], ids[:1])[0]) <= FP32
    assert max_abs_diff(mixed[1], _alone(builder, folders["a1"], ids[1:])[0]) <= FP32
    assert multi.slots == {"x": 0, "y": 1}


def test_adapter_bytes_count_what_is_resident(adapters):
    """A and B in fp32, as read: the kernel reads them where they are, serving a mixed batch adds nothing."""
    builder, folders = adapters
    multi = _served(builder, folders)
    expected = {}
    for name, folder in folders.items():
        expected[name] = sum(t.numel() * 4 for t in read_adapter(folder).tensors.values())
        assert multi.adapter_bytes(name) == expected[name]
    multi.route(list(folders))  # one row per adapter
    with torch.no_grad():
        multi.model(input_ids=token_ids(len(folders), 1, seed=3))
    assert {name: multi.adapter_bytes(name) for name in folders} == expected
    fresh = MultiLoraModel(builder())  # what a store reserves before adding: the same bytes, layers wrapped or not
    for name, folder in folders.items():
        weights = read_adapter(folder)
        needed = fresh.bytes_needed(weights)
        fresh.add(name, weights)
        assert needed == fresh.adapter_bytes(name) == expected[name]


# ---- refused, with the reason, and nothing changes ----------------------------------------------------------------
def _save(tmp_path, name, config, builder=tiny_llama, seed=0):
    torch.manual_seed(seed)
    return save_adapter(LoraModel(builder(), LoraConfig(init_lora_weights=False, **config)), tmp_path / name)


@pytest.mark.parametrize("config, words", [
    (dict(r=2, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(r=2, target_modules=["embed_tokens"]), "embedding"),
    (dict(r=2, target_modules=["q_proj"], bias="lora_only"), "trains biases"),
])
def test_unservable_adapters_are_refused(tmp_path, config, words):
    multi = MultiLoraModel(tiny_llama())
    with pytest.raises(LoraforgeError, match=words):
        multi.add("x", read_adapter(_save(tmp_path, "x", config)))
    assert multi.slots == {} and multi.layers == {}


def test_adapter_for_another_base_or_rank_is_refused(tmp_path):
    multi = MultiLoraModel(tiny_llama())
    gpt2_adapter = _save(tmp_path, "gpt2", dict(r=2, target_modules=["c_attn"]), builder=tiny_gpt2)
    with pytest.raises(LoraforgeError, match="no module .*c_attn.*another architecture"):
        multi.add("g", read_adapter(gpt2_adapter))
    folder = _save(tmp_path, "ok", dict(r=2, target_modules=["q_proj"]))
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(2, 7)  # another hidden size
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(LoraforgeError, match=r"another base model or rank"):
        multi.add("o", read_adapter(folder))
    assert multi.slots == {} and multi.layers == {}


def test_nan_weights_and_corrupt_files_are_refused(tmp_path):
    folder = _save(tmp_path, "nan", dict(r=2, target_modules=["q_proj"]))
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(LoraforgeError, match="NaN"):
        MultiLoraModel(tiny_llama()).add("n", read_adapter(folder))
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LoraforgeError, match="not a readable safetensors file"):
        read_adapter(folder)


def test_a_second_injection_is_refused(tmp_path):
    folder = _save(tmp_path, "a", dict(r=2, target_modules=["q_proj"]))
    model = tiny_llama()
    load_adapter(model, folder)  # the training layer
    with pytest.raises(LoraforgeError, match="already holds a LoRA layer"):
        MultiLoraModel(model)
    with pytest.raises(LoraforgeError, match="already holds a LoRA layer"):
        LoraModel(model, LoraConfig(r=2, target_modules="all-linear"))
    served = MultiLoraModel(tiny_llama())
    served.add("a", read_adapter(folder))
    with pytest.raises(LoraforgeError, match="already holds a LoRA layer"):
        LoraModel(served.model, LoraConfig(r=2, target_modules=["q_proj"]))


def test_merged_model_is_refused(tmp_path):
    folder = _save(tmp_path, "a", dict(r=2, target_modules=["q_proj"]))
    lm = load_adapter(tiny_llama(), folder)
    lm.merge()
    with pytest.raises(LoraforgeError, match="already holds a LoRA layer"):
        MultiLoraModel(lm.model)


# ---- the session: names, heads ------------------------------------------------------------------------------------
def test_session_refuses_unknown_names(adapters):
    builder, folders = adapters
    session = session_of(builder(), tiny_tokenizer(), a0=folders["a0"])
    with pytest.raises(LoraforgeError, match="no adapter named 'zz' is loaded; loaded: a0"):
        session.route(["a0", "zz"])
    session.remove_adapter("a0")
    with pytest.raises(LoraforgeError, match="loaded: none"):
        session.route(["a0"])


# ---- the adapter reader: one buffer, checked entries, the same tensors as safetensors' own loader ------------------
def test_reader_equals_safetensors_load_file(tmp_path):
    from safetensors.torch import load_file as st_load

    from loraforge.lora.adapter import load_safetensors

    torch.manual_seed(0)
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 2).half(),
               "i64": torch.arange(6).view(2, 3), "b": torch.tensor([True, False, True]), "odd": torch.randn(1, 3),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours, theirs = load_safetensors(tmp_path / "t.safetensors"), st_load(tmp_path / "t.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_reader_reuses_a_buffer_only_when_no_tensor_views_it(tmp_path):
    """A cold load reads into the buffer of an earlier file that nothing uses any more (no page faults), and never
    into one whose tensors are still alive (a resident adapter's)."""
    from loraforge.lora.adapter import load_safetensors

    save_file({"w": torch.full((64, 64), 1.0)}, tmp_path / "a.safetensors")
    save_file({"w": torch.full((64, 64), 2.0)}, tmp_path / "b.safetensors")
    kept = load_safetensors(tmp_path / "a.safetensors")["w"]  # alive: a resident adapter's
    second = load_safetensors(tmp_path / "b.safetensors")["w"]
    second_at = second.untyped_storage().data_ptr()
    assert second_at != kept.untyped_storage().data_ptr()
    del second  # evicted: nothing views its buffer now
    third = load_safetensors(tmp_path / "a.safetensors")["w"]
    assert third.untyped_storage().data_ptr() == second_at  # reused
    fourth = load_safetensors(tmp_path / "b.safetensors")["w"]  # both earlier buffers are in use: a new one
    assert fourth.untyped_storage().data_ptr() not in (second_at, kept.untyped_storage().data_ptr())
    assert torch.equal(kept, torch.full((64, 64), 1.0)) and torch.equal(third, torch.full((64, 64), 1.0))
    assert torch.equal(fourth, torch.full((64, 64), 2.0))


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:5], "shorter than a safetensors header"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "does not fit a file"),
    (lambda b: b[:-4], "offsets"),
    (lambda b: b[:8] + b[8:].replace(b'"F32"', b'"F99"', 1), "known dtype"),
    (lambda b: b[:8] + b[8:].replace(b"[2,3]", b"[3,3]", 1), "offsets"),
])
def test_reader_refuses_damaged_files(tmp_path, damage, words):
    from loraforge.lora.adapter import load_safetensors

    save_file({"w": torch.ones(2, 3), "v": torch.ones(4)}, tmp_path / "ok.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(damage((tmp_path / "ok.safetensors").read_bytes()))
    with pytest.raises(ValueError, match=words):
        load_safetensors(tmp_path / "bad.safetensors")
