"""QLoRA's packed base (quant/): NF4 bytes equal bitsandbytes', GGUF blocks dequantize as the gguf package does, the
QLoRA layer equals its closed form with autograd's gradients and keeps no dense weight for backward, packed sizes are
counted right, mixed-adapter serving sits on a packed base, and merging adds the update to the dequantized base."""
from __future__ import annotations

import bitsandbytes.functional as bnb_functional  # the reference (dev extras)
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fixtures.tiny_models import tiny_tokenizer
from helpers import tiny_llama, token_ids
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.lora.adapter import read_adapter
from loraforge.lora.layer import LoraLinear
from loraforge.lora.multi import MultiLoraModel
from loraforge.quant import ggml, nf4
from loraforge.quant.linear import QuantEmbedding, QuantLinear, QuantMatmul, base_weight, weight_count
from loraforge.quant.model import dequantize_model, quantize_model
from tolerances import FP32, max_abs_diff

pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2's shapes: k/v (192, 576), q/o (576, 576), MLP (1536, 576); (3, 50) and (7,) end in a short tail block.
SHAPES = [(192, 576), (576, 576), (1536, 576), (3, 50), (7,)]


def _weight(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05


# ---- NF4 against bitsandbytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double", [False, True], ids=["nf4", "nf4-dq"])
def test_nf4_bytes_absmax_and_values_equal_bitsandbytes(shape, double):
    w = _weight(shape)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)
    ours = nf4.quantize(w, double=double)
    assert torch.equal(ours["qweight"], packed.flatten())
    if double:
        assert torch.equal(ours["qabsmax"], state.absmax)
        assert torch.equal(ours["absmax2"], state.state2.absmax)
        assert torch.equal(ours["offset"], state.offset)
    else:
        assert torch.equal(ours["absmax"], state.absmax)
    assert torch.equal(nf4.dequantize(ours, shape), bnb_functional.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double", [False, True], ids=["nf4", "nf4-dq"])
def test_the_cpp_kernel_unpacks_what_the_pure_torch_path_does(dtype, double, monkeypatch):
    """The C++ unpacking (lora/csrc/quant.cpp) is the fast path, pure torch the reference and the fallback: the same
    values bit for bit, whole weights (tails and odd lengths included), panels at an offset, and into a given tensor."""
    assert nf4.unpack_kernel(torch.device("cpu")) is not None  # built here (tests/test_kernels.py needs it too)
    cases = [(shape, 0) for shape in SHAPES] + [((5, 576), 576 * 7), ((3, 128), 128 * 10), ((33,), 64)]
    fast = {}
    for i, (shape, offset) in enumerate(cases):
        packed = nf4.quantize(_weight((20, 576) if offset else shape, seed=i), double=double)
        into = torch.full(shape, float("nan"), dtype=dtype)
        assert nf4.dequantize(packed, shape, dtype, offset=offset, out=into) is into
        fast[i] = (packed, nf4.dequantize(packed, shape, dtype, offset=offset), into)
    monkeypatch.setattr(nf4, "unpack_kernel", lambda device: None)
    for i, (shape, offset) in enumerate(cases):
        packed, got, into = fast[i]
        reference = nf4.dequantize(packed, shape, dtype, offset=offset)
        assert torch.equal(got, reference) and torch.equal(into, reference), (shape, offset)


def test_nf4_code_tables_are_bitsandbytes():
    assert torch.equal(nf4.NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map())


def test_double_quantization_without_bitsandbytes_differs_only_at_near_ties(monkeypatch):
    """The pure-torch fallback picks the nearest code for each absmax; bitsandbytes' approximate binary search
    picks the neighbour for ~0.2% of them. Every difference is one code step, and bitsandbytes' code is farther by at
    most 3e-5 on the [-1, 1] scale (the absmax then differs by 3e-5 of its block's scale)."""
    w = _weight((1536, 576), seed=3)
    with_bnb = nf4.quantize(w, double=True)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)  # import fails
    fallback = nf4.quantize(w, double=True)
    assert torch.equal(fallback["qweight"], with_bnb["qweight"])
    assert torch.equal(fallback["absmax2"], with_bnb["absmax2"])
    differ = (fallback["qabsmax"] != with_bnb["qabsmax"]).nonzero().flatten()
    assert len(differ) <= 0.005 * len(fallback["qabsmax"])
    code = nf4.dynamic_map()
    scaled = (nf4.quantize(w)["absmax"] - fallback["offset"]).view(-1, 256) / fallback["absmax2"][:, None]
    for i in differ.tolist():
        x, a, b = scaled.flatten()[i], code[fallback["qabsmax"][i].long()], code[with_bnb["qabsmax"][i].long()]
        assert abs(int(fallback["qabsmax"][i]) - int(with_bnb["qabsmax"][i])) == 1
        assert (x - a).abs() <= (x - b).abs() <= (x - a).abs() + 3e-5  # ours is the nearer, by under 3e-5


def test_nf4_sizes():
    w = _weight((1536, 576))
    assert QuantLinear("nf4", nf4.quantize(w), 576, 1536).weight_bytes / w.numel() == 0.5625
    assert QuantLinear("nf4-dq", nf4.quantize(w, double=True), 576, 1536).weight_bytes / w.numel() < 0.5165


# ---- GGUF blocks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ggml.FORMATS)
def test_gguf_blocks_dequantize_as_the_gguf_package(fmt):
    from gguf import GGMLQuantizationType, quants

    w = _weight((96, 256), seed=1).numpy()
    qtype = GGMLQuantizationType[fmt.upper()]
    blocks = quants.quantize(w, qtype)
    expected = torch.from_numpy(quants.dequantize(blocks, qtype))
    assert torch.equal(ggml.dequantize(torch.from_numpy(blocks), fmt, (96, 256)), expected)
    assert blocks.shape[1] == 256 // 32 * ggml.block_bytes(fmt)


# ---- the QLoRA layer --------------------------------------------------------------------------------------------
@pytest.fixture(params=["nf4", "nf4-dq", "q4_1"])
def packed_linear(request) -> QuantLinear:
    w = _weight((48, 64), seed=2)
    if request.param == "q4_1":
        from gguf import GGMLQuantizationType, quants

        blocks = torch.from_numpy(quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1))
        return QuantLinear("q4_1", {"blocks": blocks}, 64, 48, bias=torch.randn(48))
    return QuantLinear.from_linear(nn.Linear(64, 48).requires_grad_(False), request.param)


def test_qlora_layer_is_its_closed_form_and_gradients_are_autograds(packed_linear):
    """y = x W_dqᵀ + b + s·B A x, bit for bit in fp32; the gradients of x, A and B equal autograd's through the
    dequantized weight (the same ops, so equal to fp32 rounding)."""
    torch.manual_seed(0)
    layer = LoraLinear(packed_linear, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    w = packed_linear.dequantize(torch.float32)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = F.linear(x, w) + packed_linear.bias + F.linear(F.linear(x, a), b * layer.scaling)
    assert torch.equal(y, expected)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), grad)
    want = torch.autograd.grad(expected, (x, a, b), grad)
    for g, e in zip(got, want):
        assert max_abs_diff(g, e) <= FP32


def test_backward_keeps_no_dense_weight(packed_linear):
    """Nothing of the weight's size is saved for backward: the packed layer dequantizes again."""
    saved: list[torch.Tensor] = []
    layer = LoraLinear(packed_linear, r=4, lora_alpha=8)
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    weight_size = packed_linear.in_features * packed_linear.out_features
    assert saved and all(t.numel() < weight_size for t in saved)
    assert QuantMatmul  # the Function that does it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_big_weight_unpacks_a_panel_at_a_time_to_the_same_values(packed_linear, monkeypatch, dtype):
    """Panels of 5 rows (48 rows: the last panel short) give every value the one-pass unpacking gives, and no
    intermediate of the whole weight's size is made."""
    whole = packed_linear.dequantize(dtype)
    packed = packed_linear.packed()
    expected = (nf4.dequantize(packed, (48, 64), dtype) if packed_linear.fmt.startswith("nf4")
                else ggml.dequantize(packed["blocks"], "q4_1", (48, 64), dtype))
    assert torch.equal(whole, expected)
    monkeypatch.setattr(nf4, "unpack_kernel", lambda device: None)  # the C++ kernel goes whole, in one call
    monkeypatch.setattr("loraforge.quant.linear.CHUNK_WEIGHTS", 5 * 64)
    assert packed_linear._panel_rows() == 5
    assert torch.equal(packed_linear.dequantize(dtype), whole)
    with pytest.raises(ValueError, match="does not start an NF4 block"):
        nf4.dequantize(nf4.quantize(_weight((4, 64))), (2, 64), offset=32)


def test_base_weight_is_the_one_accessor(packed_linear):
    dense = nn.Linear(64, 48)
    assert base_weight(dense) is dense.weight
    assert torch.equal(base_weight(packed_linear, torch.float64), packed_linear.dequantize(torch.float64))
    assert packed_linear.to(torch.bfloat16).dequantize().dtype == torch.float32  # the bytes were not rounded
    assert torch.equal(packed_linear.dequantize(), base_weight(packed_linear))


def test_a_big_packed_weight_multiplies_a_panel_at_a_time(packed_linear, monkeypatch):
    """Above PANEL_MATMUL_WEIGHTS the forward and the input's gradient go a panel of outputs at a time (here 3 panels
    of 16 rows): the same values as one matmul with the dequantized weight, to fp32 rounding."""
    monkeypatch.setattr("loraforge.quant.linear.PANEL_MATMUL_WEIGHTS", 48 * 64 - 1)
    monkeypatch.setattr("loraforge.quant.linear.MATMUL_PANEL_WEIGHTS", 16 * 64)
    unpacked = []
    original = type(packed_linear)._dequantize_rows
    monkeypatch.setattr(type(packed_linear), "_dequantize_rows",
                        lambda self, *a: unpacked.append(a[2] - a[1]) or original(self, *a))
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = packed_linear(x)
    y.backward(grad := torch.randn_like(y))
    w = packed_linear.dequantize()
    assert unpacked[:6] == [16] * 6  # three panels forward, three backward; never the whole 48 rows
    expected = F.linear(x, w) + packed_linear.bias
    assert max_abs_diff(y, expected) <= FP32
    assert max_abs_diff(x.grad, grad @ w) <= FP32


@pytest.mark.parametrize("method", ["nf4", "nf4-dq"])
def test_packed_embedding_rows_are_the_dequantized_rows(method):
    dense = nn.Embedding(50, 128)
    dense.weight.data = _weight((50, 128), seed=7)
    packed = QuantEmbedding.from_embedding(dense, method)
    ids = torch.tensor([[0, 49, 3], [3, 7, 0]])
    assert torch.equal(packed(ids), F.embedding(ids, packed.dequantize()))
    assert packed.dequantize().equal(nf4.dequantize(nf4.quantize(dense.weight, double=method == "nf4-dq"), (50, 128)))
    assert packed.weight_bytes / packed.num_weights == (0.5625 if method == "nf4" else pytest.approx(0.516, abs=2e-3))
    with pytest.raises(ValueError, match="whole 64-weight blocks"):
        QuantEmbedding.from_embedding(nn.Embedding(5, 48), method)


# ---- a whole model ----------------------------------------------------------------------------------------------
def _tiny_nf4() -> nn.Module:
    model = tiny_llama()
    quantize_model(model, "nf4")
    return model


def test_quantize_model_packs_the_body_and_counts_it():
    dense = tiny_llama()
    params, size = weight_count(dense)
    model = _tiny_nf4()
    packed = [p for p, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 7 * 2 and not isinstance(model.lm_head, QuantLinear)  # every body linear, not the head
    assert not any(m.training for m in model.modules())  # an eval model stays in eval (no LoRA dropout)
    q_params, q_size = weight_count(model)
    assert q_params == params
    body = sum(m.num_weights for m in model.modules() if isinstance(m, QuantLinear))
    assert q_size == size - 4 * body + sum(m.weight_bytes for m in model.modules() if isinstance(m, QuantLinear))
    report = LoraModel(model, LoraConfig(r=2, target_modules="all-linear")).report()
    assert report.total == params + report.trainable


def test_mixed_batch_on_a_packed_base_equals_each_adapter_alone(tmp_path):
    """The serving layer on a packed base: each row equals the training layer with its adapter on the same base."""
    folders = {}
    for k, targets in enumerate(["all-linear", ["q_proj", "down_proj"]]):
        torch.manual_seed(10 + k)
        lm = LoraModel(_tiny_nf4(), LoraConfig(r=2 + k, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        folders[f"a{k}"] = save_adapter(lm, tmp_path / f"a{k}")
    multi = MultiLoraModel(_tiny_nf4(), wrap_all=True)
    for name, folder in folders.items():
        multi.add(name, read_adapter(folder))
    names = ["a0", None, "a1"]
    ids = token_ids(3, 6, seed=5)
    for few_rows in (False, True):
        multi.routing.small_batch_kernel = few_rows
        for length in (6, 1):
            multi.route(names)
            with torch.no_grad():
                mixed = multi.model(input_ids=ids[:, :length]).logits
            for i, name in enumerate(names):
                model = _tiny_nf4()
                if name is not None:
                    from loraforge.lora import load_adapter

                    load_adapter(model, folders[name])
                with torch.no_grad():
                    alone = model(input_ids=ids[i:i + 1, :length]).logits[0]
                assert max_abs_diff(mixed[i], alone) <= FP32


def test_merge_adds_the_update_to_the_dequantized_base_and_unmerge_restores_the_packed_layer():
    torch.manual_seed(0)
    lm = LoraModel(_tiny_nf4(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ids = token_ids()
    with torch.no_grad():
        unmerged = lm.model(input_ids=ids).logits
        packed = lm.layers["model.layers.0.self_attn.q_proj"].base_layer
        expected = packed.dequantize() + lm.layers["model.layers.0.self_attn.q_proj"].delta_weight()
        lm.merge()
        merged = lm.model(input_ids=ids).logits
        layer = lm.layers["model.layers.0.self_attn.q_proj"]
        assert type(layer.base_layer) is nn.Linear and torch.equal(layer.base_layer.weight, expected)
        assert max_abs_diff(merged, unmerged) <= FP32
        lm.unmerge()
        assert layer.base_layer is packed
        assert torch.equal(lm.model(input_ids=ids).logits, unmerged)
        lm.merge()
        plain = dequantize_model(lm.merge_and_unload())
    assert plain == 7 * 2 - 7 * 2  # every body layer was targeted, so all are dense already
    assert not any(isinstance(m, QuantLinear) for m in lm.model.modules())
    with torch.no_grad():
        assert max_abs_diff(lm.model(input_ids=ids).logits, unmerged) <= FP32


def test_dequantize_model_writes_plain_weights(tmp_path):
    model = _tiny_nf4()
    ids = token_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert dequantize_model(model) == 14
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    from loraforge.models import load_model

    loaded, _ = load_model(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, before)


def _llama_64(tied: bool) -> nn.Module:
    """A tiny Llama whose hidden size is one NF4 block, so its embedding rows can be packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_nf4_all_packs_the_embedding_and_head_and_trains_on_them(tied, monkeypatch):
    """`nf4-all`: the embedding and head packed too (a tied head reads the embedding's bytes, counted once). The
    loss, its panel-wise packed head included, and the adapter's gradients equal the same model with every packed
    weight dequantized, to fp32 rounding; dequantizing gives a plain model (tied again where it was)."""
    from loraforge.train.loss import causal_lm_loss

    monkeypatch.setattr("loraforge.quant.linear.MATMUL_PANEL_WEIGHTS", 40 * 64)  # the head in 3 panels
    dense = _llama_64(tied)
    params, size = weight_count(dense)
    model = _llama_64(tied)
    summary = quantize_model(model, "nf4-all")
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, QuantEmbedding) and isinstance(head, QuantLinear)
    assert (head.qweight.data_ptr() == embedding.qweight.data_ptr()) == tied
    assert summary["layers"] == 14 + (1 if tied else 2)
    embed_head = 96 * 64 * (1 if tied else 2)
    q_params, q_size = weight_count(model)
    assert q_params == params
    assert q_size == size - 4 * (summary["dense_bytes"] // 4) + summary["packed_bytes"]
    assert summary["packed_bytes"] == pytest.approx(0.5625 * (summary["dense_bytes"] / 4), rel=0)
    assert embed_head * 4 <= summary["dense_bytes"]
    plain = _llama_64(tied)
    quantize_model(plain, "nf4-all")
    assert dequantize_model(plain) == 14 + 2
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    losses, grads = [], []
    for m in (model, plain):
        torch.manual_seed(5)
        lm = LoraModel(m, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False))
        loss = causal_lm_loss(m, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in lm.adapter_parameters().values()]))
    assert max_abs_diff(losses[0], losses[1]) <= FP32
    assert max_abs_diff(grads[0], grads[1]) <= FP32
    with torch.no_grad():
        assert max_abs_diff(model(input_ids=ids).logits, plain(input_ids=ids).logits) <= FP32


def test_nf4_all_needs_rows_of_whole_blocks_and_cannot_train_the_packed_head():
    from loraforge.errors import LoraforgeError

    with pytest.raises(LoraforgeError, match="hidden size 16 is not a multiple of NF4's block of 64.*--quantize nf4"):
        quantize_model(tiny_llama(), "nf4-all")
    model = _llama_64(tied=False)
    quantize_model(model, "nf4-all")
    with pytest.raises(LoraforgeError, match="lm_head is packed .* cannot be trained; use --quantize nf4"):
        LoraModel(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def test_gguf_quantize_needs_a_gguf_file():
    from loraforge.errors import LoraforgeError

    with pytest.raises(LoraforgeError, match="not loaded from a .gguf"):
        quantize_model(tiny_llama(), "gguf", None)


@pytest.mark.integration
def test_default_model_keeps_its_q4_1_blocks_exactly(default_model_dir):
    """--quantize gguf on the default model: every linear keeps the file's Q4_1 blocks (rows of q and k put back in
    transformers' order), 0.156 of the fp32 bytes, and the logits equal the dense model's bit for bit."""
    from loraforge.models import DEFAULT_MODEL, load_model

    dense, tokenizer = load_model(DEFAULT_MODEL)
    packed, _ = load_model(DEFAULT_MODEL, quantize="gguf")
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 210 and {m.fmt for m in layers} == {"q4_1"}
    assert sum(m.weight_bytes for m in layers) / (4 * sum(m.num_weights for m in layers)) == 0.15625
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)
    k = packed.model.layers[3].self_attn.k_proj  # a permuted one, (192, 576): a real k/v shape
    expected = dense.model.layers[3].self_attn.k_proj.weight.detach()
    assert torch.equal(k.dequantize(), expected)
    ours = nf4.quantize(expected)
    bnb_packed, state = bnb_functional.quantize_4bit(expected, blocksize=64, quant_type="nf4")
    assert torch.equal(ours["qweight"], bnb_packed.flatten()) and torch.equal(ours["absmax"], state.absmax)
    error = float(nf4.dequantize(ours, (192, 576)).sub(expected).norm() / expected.norm())
    assert 0.07 < error < 0.11  # re-quantizing the Q4_1 weights to NF4: a second error of ~9% of the weight (0.093)


def test_train_on_nf4_then_merge_writes_the_trained_function_dense(llama_dir, data_file, tmp_path):
    """`train --quantize nf4` records it beside the adapter; `merge` then loads the same packed base, adds the update to
    its dequantized weights and writes plain safetensors whose logits are the QLoRA model's."""
    from loraforge.cli import main
    from loraforge.config import TrainConfig, adapter_quantize
    from loraforge.lora import load_adapter
    from loraforge.models import load_model
    from loraforge.train import train

    adapter = tmp_path / "qlora"
    train(TrainConfig(model=str(llama_dir), data=str(data_file), output=str(adapter), max_steps=3, batch_size=2,
                      lr=5e-2, r=4, lora_alpha=8, quantize="nf4", target_modules=["q_proj", "up_proj"],
                      dtype="float32"), progress=False)
    assert adapter_quantize([adapter]) == "nf4"
    qlora, tokenizer = load_model(str(llama_dir), quantize="nf4")
    load_adapter(qlora, adapter)
    dense_base, _ = load_model(str(llama_dir))
    ids = tokenizer("a b c d", return_tensors="pt").input_ids
    assert main(["merge", "--adapter", str(adapter), "--model", str(llama_dir), "--output", str(tmp_path / "m")]) == 0
    merged, _ = load_model(str(tmp_path / "m"))
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    with torch.no_grad():
        want, got, base = (m(ids).logits for m in (qlora, merged, dense_base))
    assert max_abs_diff(got, want) <= FP32
    assert max_abs_diff(got, base) > 100 * FP32  # not the dense base's function


# ---- LoftQ ------------------------------------------------------------------------------------------------------
def test_loftq_starts_nearer_the_dense_weight_in_every_layer():
    """‖W − (Q + s·BA)‖ < ‖W − quant(W)‖ for every layer, the base packed as Q; more iterations fit better."""
    from loraforge.quant.loftq import apply_loftq, loftq

    dense = tiny_llama()
    lm = LoraModel(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ratios = apply_loftq(lm, "nf4")
    assert len(ratios) == 14 and all(0 < r < 1 for r in ratios.values())
    for path, layer in lm.layers.items():
        assert isinstance(layer.base_layer, QuantLinear)
        w = dense.get_submodule(path).weight
        start = layer.base_layer.dequantize() + layer.delta_weight()
        plain = nf4.dequantize(nf4.quantize(w), tuple(w.shape))
        assert float((w - start).norm() / (w - plain).norm()) == pytest.approx(ratios[path], rel=1e-5)
    w = _weight((192, 576), seed=4)
    fits = [loftq(w, "nf4", 16, 2.0, iters)[3] for iters in (1, 2, 5)]
    assert fits[0] > fits[1] > fits[2]  # measured 0.95, 0.91, 0.87 on a random (576, 576)


@pytest.fixture(scope="module")
def loftq_runs(llama_dir, data_file, tmp_path_factory):
    """The tiny Llama trained 2 steps from a LoftQ start on NF4, with 3 alternations (the base moves) and with 1."""
    from loraforge.config import TrainConfig
    from loraforge.train import train

    root = tmp_path_factory.mktemp("loftq")
    runs = {}
    for iters in (3, 1):
        cfg = TrainConfig(model=str(llama_dir), data=str(data_file), output=str(root / f"t{iters}"), max_steps=2,
                          batch_size=2, max_length=32, r=4, lora_alpha=8, quantize="nf4", lora_init="loftq",
                          loftq_iter=iters, target_modules="all-linear", lr=1e-2,
                          dtype="float32")  # auto would train in bf16 on a CPU with it, and loads are fp32
        result = train(cfg, progress=False)
        ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
        with torch.no_grad():
            runs[iters] = (root / f"t{iters}", ids, result.lora.model(ids).logits)
    return runs


def test_loftq_moved_base_is_saved_and_every_load_puts_it_back(loftq_runs, llama_dir, tmp_path, capsys):
    """loftq_iter 3: Q_T is saved beside the adapter, and a session (and merge) on it gives the trained model's
    logits; loftq_iter 1 moves nothing and saves nothing. A moved base is every row's, so such an adapter is served
    alone."""
    from loraforge.cli import main
    from loraforge.errors import LoraforgeError
    from loraforge.infer import InferenceSession
    from loraforge.models import load_model
    from loraforge.quant.loftq import MOVED_BASE

    moved, ids, trained = loftq_runs[3]
    assert (moved / MOVED_BASE).is_file() and not (loftq_runs[1][0] / MOVED_BASE).exists()
    for iters in (3, 1):
        folder, _, logits = loftq_runs[iters]
        session = InferenceSession.open(str(llama_dir), {"a": folder})
        with session.use("a") as model, torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=0)
    with pytest.raises(LoraforgeError, match="serve it alone"):
        InferenceSession.open(str(llama_dir), {"a": moved, "b": loftq_runs[1][0]})
    session = InferenceSession.open(str(llama_dir), {"b": loftq_runs[1][0]})
    with pytest.raises(LoraforgeError, match="base of its own"):
        session.add_adapter("a", moved)
    assert main(["merge", "--adapter", str(moved), "--output", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, atol=1e-4, rtol=0)
    assert main(["export", "--adapter", str(moved), "--merged", "--output", str(tmp_path / "m.gguf")]) == 2
    assert "LoftQ base of its own" in capsys.readouterr().err


def test_loftq_needs_an_nf4_base():
    from loraforge.config import TrainConfig
    from loraforge.errors import LoraforgeError

    for bad in (dict(quantize="none"), dict(quantize="gguf"), dict(quantize="nf4", per_user="user"),
                dict(quantize="nf4", loftq_iter=6), dict(quantize="nf4", loftq_iter=0)):
        with pytest.raises(LoraforgeError, match="loftq"):
            TrainConfig(model="m", data="d", output="o", lora_init="loftq", **bad)
    with pytest.raises(LoraforgeError, match="needs lora_init loftq"):
        TrainConfig(model="m", data="d", output="o", quantize="nf4", loftq_iter=2)
