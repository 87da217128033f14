"""`loraforge combine`: several adapters on one base -> one PEFT-format adapter (src/loraforge/lora/combine.py).

Each module's update is checked against the closed form (sum_i w_i · s_i B_i A_i, with each adapter's own scaling),
against the real `peft` package's `add_weighted_adapter` where PEFT computes the same thing, and by loading the
result in PEFT, in loraforge's training layer and in the inference session's serving layer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from helpers import logits, session_of, tiny_bert_cls, tiny_gpt2, tiny_llama
from loraforge.cli import main
from loraforge.errors import LoraforgeError
from loraforge.lora import LoraConfig, LoraModel, combine_adapters, load_adapter, save_adapter
from tolerances import FP32, max_abs_diff

pytestmark = pytest.mark.usefixtures("one_thread")
EXACT = 1e-6  # fp32 factors of O(1) updates: what "exact" means for cat


def _save(directory: Path, seed: int, **options) -> Path:
    """A random (init_lora_weights=False) adapter on tiny_llama(), written to `directory`."""
    model = tiny_llama()
    torch.manual_seed(seed)  # after building the base: tiny_llama() reseeds, and the adapters must differ
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                  task_type="CAUSAL_LM") | options
    save_adapter(LoraModel(model, LoraConfig(**config)), directory)
    return directory


def _deltas(directory: Path) -> dict[str, torch.Tensor]:
    """Each module's update scaling · B A as loraforge's training layer loads it (patterns, rsLoRA included)."""
    return {path: layer.delta_weight() for path, layer in load_adapter(tiny_llama(), directory).layers.items()}


def _weighted_sum(weights: list[float], *adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    paths = sorted(set().union(*adapters))
    return {p: sum(w * a[p] for w, a in zip(weights, adapters) if p in a) for p in paths}


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(want)
    return max(max_abs_diff(got[p], want[p]) for p in want)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, Path]:
    """Three adapters that differ in everything cat must handle: rank, alpha, rsLoRA, targets, rank/alpha patterns."""
    root = tmp_path_factory.mktemp("mixed")
    return {
        "a": _save(root / "a", 1, r=4, lora_alpha=8),
        "b": _save(root / "b", 2, r=2, lora_alpha=16, use_rslora=True),
        "c": _save(root / "c", 3, r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"],
                   rank_pattern={"layers.1.self_attn.q_proj": 6}, alpha_pattern={"o_proj": 2}),
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """Two adapters of equal rank (what PEFT's linear/ties need), different alphas."""
    root = tmp_path_factory.mktemp("pair")
    return {"a": _save(root / "a", 1, r=4, lora_alpha=8), "b": _save(root / "b", 2, r=4, lora_alpha=16)}


# ---- cat: the exact weighted sum ------------------------------------------------------------------------------
def test_cat_is_the_exact_weighted_sum(mixed, tmp_path):
    weights = [0.7, -0.4, 1.3]
    result = combine_adapters(list(mixed.values()), tmp_path / "out", "cat", weights)
    want = _weighted_sum(weights, *(_deltas(d) for d in mixed.values()))
    got = _deltas(tmp_path / "out")
    assert _max_diff(got, want) <= EXACT
    assert max(t.abs().max().item() for t in want.values()) > 1.0  # updates of O(1): 1e-6 means something
    # rank = the sum of the ranks present at each module; scaling 1 (alpha = rank, no rsLoRA)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ranks = {p: layer.r for p, layer in load_adapter(tiny_llama(), tmp_path / "out").layers.items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": 4 + 2 + 3, "model.layers.1.self_attn.q_proj": 4 + 2 + 6,
                     "model.layers.0.self_attn.v_proj": 4 + 2, "model.layers.1.self_attn.v_proj": 4 + 2,
                     "model.layers.0.self_attn.o_proj": 3, "model.layers.1.self_attn.o_proj": 3}
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, 6, False)
    assert config["rank_pattern"] == config["alpha_pattern"] == {
        r"model\.layers\.0\.self_attn\.q_proj": 9, r"model\.layers\.1\.self_attn\.q_proj": 12,
        r"model\.layers\.0\.self_attn\.o_proj": 3, r"model\.layers\.1\.self_attn\.o_proj": 3}
    assert config["target_modules"] == ["o_proj", "q_proj", "v_proj"]  # the union
    assert result.errors == {}


@pytest.mark.parametrize("method,options", [("cat", {}), ("svd", dict(rank=5))])
def test_combined_output_loads_in_peft_loraforge_and_the_session(mixed, tmp_path, method, options):
    result = combine_adapters(list(mixed.values()), tmp_path / "out", method, [0.7, -0.4, 1.3], **options)
    ours = logits(load_adapter(tiny_llama(), tmp_path / "out").model)
    theirs = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval())
    session = session_of(tiny_llama(), None, combined=tmp_path / "out")
    session.add_adapter("in_memory", result.adapter)  # the result as it is, never written
    with session.use("combined") as model:
        served = logits(model)
    with session.use("in_memory") as model:
        served_in_memory = logits(model)
    assert max_abs_diff(ours, logits(tiny_llama())) > 1e-1  # the adapter does something
    assert max_abs_diff(theirs, ours) <= FP32
    assert max_abs_diff(served, ours) <= FP32
    assert max_abs_diff(served_in_memory, ours) <= FP32


@pytest.mark.parametrize("arch", ["gpt2_conv1d", "llama_embedding"])
def test_conv1d_and_embedding_adapters_saved_by_peft(arch, tmp_path):
    # one adapter saved by PEFT (GPT-2's Conv1D with fan_in_fan_out; an embedding with its base weight saved beside
    # it), one by loraforge; ranks 4 and 2
    builder, targets = (tiny_gpt2, ["c_attn", "c_proj"]) if arch == "gpt2_conv1d" else \
        (tiny_llama, ["embed_tokens", "q_proj"])
    model = builder()
    torch.manual_seed(1)
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                               fan_in_fan_out=arch == "gpt2_conv1d")).save_pretrained(tmp_path / "a")
    model = builder()
    torch.manual_seed(2)
    save_adapter(LoraModel(model, LoraConfig(r=2, lora_alpha=8, target_modules=targets, init_lora_weights=False)),
                 tmp_path / "b")
    combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out", "cat", [0.6, 0.8])
    deltas = [{p: layer.delta_weight() for p, layer in load_adapter(builder(), tmp_path / d).layers.items()}
              for d in ("a", "b", "out")]
    assert _max_diff(deltas[2], _weighted_sum([0.6, 0.8], *deltas[:2])) <= 1e-5  # embedding updates are O(10)
    ours = logits(load_adapter(builder(), tmp_path / "out").model)
    assert max_abs_diff(logits(peft.PeftModel.from_pretrained(builder(), tmp_path / "out").eval()), ours) <= FP32
    if arch == "llama_embedding":  # PEFT's saved base weight is carried over
        key = "base_model.model.model.embed_tokens.base_layer.weight"
        assert key in load_file(tmp_path / "out" / "adapter_model.safetensors")


# ---- one adapter at weight 1 gives itself back ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_one_adapter_at_weight_one_is_itself(method, tmp_path):
    source = _save(tmp_path / "a", 1, r=4, lora_alpha=6, use_rslora=True)
    result = combine_adapters([source], tmp_path / "out", method, [1.0])
    assert max_abs_diff(logits(load_adapter(tiny_llama(), tmp_path / "out").model),
                        logits(load_adapter(tiny_llama(), source).model)) <= FP32
    assert _max_diff(_deltas(tmp_path / "out"), _deltas(source)) <= EXACT
    if method == "svd":  # default rank = the input's: full rank
        assert max(result.errors.values()) < 1e-6


# ---- svd: exact at full rank, the reported error at lower rank ------------------------------------------------
def test_svd_full_rank_is_exact_and_lower_rank_reports_the_true_error(pair, tmp_path):
    weights = [0.6, 0.9]
    want = _weighted_sum(weights, *(_deltas(d) for d in pair.values()))
    full = combine_adapters(list(pair.values()), tmp_path / "full", "svd", weights, rank=8)  # 4 + 4
    assert _max_diff(_deltas(tmp_path / "full"), want) <= 1e-5
    assert max(full.errors.values()) < 1e-6
    low = combine_adapters(list(pair.values()), tmp_path / "low", "svd", weights, rank=3)
    got = _deltas(tmp_path / "low")
    assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["r"] == 3
    for path, error in low.errors.items():
        assert error > 0.05  # a real truncation
        assert abs(error - _rel_error(got[path], want[path])) <= 1e-5
        # and it is the best rank-3 approximation (Eckart–Young): the error of the truncated true SVD
        s = torch.linalg.svdvals(want[path].double())
        assert abs(error - (s[3:].square().sum() / s.square().sum()).sqrt().item()) <= 1e-5


# ---- against PEFT's add_weighted_adapter ----------------------------------------------------------------------
def _peft_combined(folders: dict[str, Path], weights: list[float], combination: str, **kwargs):
    """PEFT's own result: the adapters loaded under their names, add_weighted_adapter, each module's update."""
    (first, folder), *rest = folders.items()
    model = peft.PeftModel.from_pretrained(tiny_llama(), folder, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    model.add_weighted_adapter(list(folders), weights, "mix", combination_type=combination, **kwargs)
    layers = {name: module for name, module in model.base_model.model.named_modules()
              if isinstance(module, peft.tuners.lora.LoraLayer)}
    return {name: layer.get_delta_weight("mix") for name, layer in layers.items()}, model.peft_config["mix"]


@pytest.mark.parametrize("method,peft_method,options", [
    ("cat", "cat", {}),
    ("linear", "linear", {}),
    ("ties", "ties_svd", dict(density=0.5, majority_sign="total")),
    ("ties", "ties_svd", dict(density=0.3, majority_sign="frequency")),
    ("magnitude_prune", "magnitude_prune_svd", dict(density=0.5)),
])
def test_same_updates_as_peft(pair, tmp_path, method, peft_method, options):
    weights = [0.7, 0.5]
    combine_adapters(list(pair.values()), tmp_path / "out", method, weights, **options)
    peft_options = {"density": options["density"]} if "density" in options else {}
    if "majority_sign" in options:
        peft_options["majority_sign_method"] = options["majority_sign"]
    theirs, _ = _peft_combined(pair, weights, peft_method, **peft_options)
    ours = _deltas(tmp_path / "out")
    assert _max_diff(ours, theirs) <= FP32
    if method == "linear":  # PEFT's linear is not the weighted sum of updates: the cross terms B_a A_b are in it
        want = _weighted_sum(weights, *(_deltas(d) for d in pair.values()))
        assert min(_rel_error(ours[p], want[p]) for p in want) > 0.3


def test_ties_with_unequal_ranks_and_targets_as_peft(mixed, tmp_path):
    # ties on the task vectors needs no common rank; a module missing from an adapter is a zero task vector (it
    # votes for no sign and is not counted), as PEFT leaves it out. Default rank: the largest input rank (6).
    weights = [0.7, 0.4, 1.3]
    result = combine_adapters(list(mixed.values()), tmp_path / "out", "ties", weights, density=0.4)
    theirs, config = _peft_combined(mixed, weights, "ties_svd", density=0.4)
    assert config.r == json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 6
    assert _max_diff(_deltas(tmp_path / "out"), theirs) <= FP32
    assert sorted(result.errors) == sorted(theirs)


def test_svd_against_peft(pair, tmp_path):
    # PEFT 0.21.2 computes svd right when its first adapter is plain LoRA: the same truncated update as ours.
    weights = [0.7, -0.5]
    combine_adapters(list(pair.values()), tmp_path / "out", "svd", weights, rank=3)
    theirs, _ = _peft_combined(pair, weights, "svd", svd_rank=3)
    ours = _deltas(tmp_path / "out")
    assert _max_diff(ours, theirs) <= FP32
    # When the first adapter uses rsLoRA, PEFT's new adapter inherits use_rslora with lora_alpha = r = R, so its
    # scaling is R / sqrt(R) = sqrt(R) instead of 1 (huggingface/peft#3449, after 0.21.2): svd and cat come out
    # sqrt(R) times too large. Ours is the truncated true update.
    folders = {"a": _save(tmp_path / "rs", 1, r=4, lora_alpha=8, use_rslora=True), "b": pair["b"]}
    want = _weighted_sum(weights, *(_deltas(d) for d in folders.values()))
    combine_adapters(list(folders.values()), tmp_path / "out_rs", "svd", weights, rank=8)  # full rank: exact
    ours = _deltas(tmp_path / "out_rs")
    assert _max_diff(ours, want) <= 1e-5
    theirs, config = _peft_combined(folders, weights, "svd", svd_rank=8)
    assert config.use_rslora and config.r == config.lora_alpha == 8
    for path in want:
        ratio = (theirs[path].norm() / want[path].norm()).item()
        assert abs(ratio - math.sqrt(8)) <= 1e-4  # PEFT's update: 2.83 x the true one
        assert max_abs_diff(theirs[path], math.sqrt(8) * want[path]) <= 1e-4
    theirs, _ = _peft_combined(folders, weights, "cat")
    assert _max_diff(theirs, {p: math.sqrt(8) * d for p, d in want.items()}) <= 1e-4  # cat: sqrt(4 + 4) too
    combine_adapters(list(folders.values()), tmp_path / "cat_rs", "cat", weights)
    assert _max_diff(_deltas(tmp_path / "cat_rs"), want) <= EXACT


# ---- DARE ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_under_a_seed(pair, tmp_path, method):
    def run(name: str, seed: int) -> dict[str, torch.Tensor]:
        combine_adapters(list(pair.values()), tmp_path / name, method, [0.7, 0.5], density=0.5, seed=seed)
        return _deltas(tmp_path / name)

    first, again, other = run("s0", 0), run("s0_again", 0), run("s1", 1)
    assert all(torch.equal(first[p], again[p]) for p in first)
    assert min(max_abs_diff(first[p], other[p]) for p in first) > 1e-2


def test_dare_linear_at_density_one_is_svd(pair, tmp_path):
    combine_adapters(list(pair.values()), tmp_path / "dare", "dare_linear", [0.7, 0.5], density=1.0, rank=8)
    combine_adapters(list(pair.values()), tmp_path / "svd", "svd", [0.7, 0.5], rank=8)
    assert _max_diff(_deltas(tmp_path / "dare"), _deltas(tmp_path / "svd")) <= 1e-6


# ---- the CLI --------------------------------------------------------------------------------------------------
def test_cli_combine(pair, tmp_path, capsys):
    args = ["combine", "--adapter", str(pair["a"]), "--adapter", str(pair["b"]), "--method", "ties",
            "--weights", "0.7,0.5", "--density", "0.5", "--majority-sign", "frequency", "--rank", "3",
            "--output", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ties of 2 adapters written to" in out and "relative Frobenius error" in out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (3, 3)
    assert main(["combine", "--adapter", str(pair["a"]), "--adapter", str(pair["b"]), "--method", "cat",
                 "--weights=-1,1", "--output", str(tmp_path / "diff")]) == 0
    want = _weighted_sum([-1.0, 1.0], *(_deltas(d) for d in pair.values()))
    assert _max_diff(_deltas(tmp_path / "diff"), want) <= EXACT


def _bases(tmp_path: Path) -> list[str]:
    return [str(_save(tmp_path / "x", 1, base_model_name_or_path="org/base-x")),
            str(_save(tmp_path / "y", 2, base_model_name_or_path="org/base-y"))]


@pytest.mark.parametrize("case,expect", [
    ("linear_ranks", ["--method linear", "r=4", "r=2", "cat", "svd"]),
    ("bases", ["different base models", "org/base-x", "org/base-y"]),
    ("dora", ["DoRA"]),
    ("weights", ["--weights has 3 value(s) for 2 adapter(s)"]),
    ("weights_typo", ["--weights must be comma-separated numbers", "'1,x'"]),
    ("density", ["--density must be in (0, 1]"]),
    ("no_density", ["--method ties needs --density"]),
    ("method", ["unknown combination method 'mean'", "cat, linear, svd"]),
    ("head", ["carries trained modules", "classifier"]),
    ("output", ["exists and is not an empty folder"]),
])
def test_cli_refusals(pair, tmp_path, capsys, case, expect):
    a, b = str(pair["a"]), str(pair["b"])
    extra: list[str] = []
    method = "cat"
    if case == "linear_ranks":
        b, method = str(_save(tmp_path / "r2", 2, r=2, lora_alpha=4)), "linear"
    elif case == "bases":
        a, b = _bases(tmp_path)
    elif case == "dora":
        b = str(_save(tmp_path / "dora", 2, use_dora=True))
    elif case == "weights":
        extra = ["--weights", "1,2,3"]
    elif case == "weights_typo":
        extra = ["--weights", "1,x"]
    elif case == "density":
        method, extra = "ties", ["--density", "1.5"]
    elif case == "no_density":
        method = "ties"
    elif case == "method":
        method = "mean"
    elif case == "head":
        model = tiny_bert_cls()
        torch.manual_seed(3)
        save_adapter(LoraModel(model, LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS",
                                                 init_lora_weights=False)), tmp_path / "head")
        a = b = str(tmp_path / "head")
    elif case == "output":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    code = main(["combine", "--adapter", a, "--adapter", b, "--method", method, "--output", str(tmp_path / "out"),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("loraforge: error:")
    for text in expect:
        assert text in err
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_python_api_refuses_rank_for_cat(pair, tmp_path):
    with pytest.raises(LoraforgeError, match="--rank applies to the SVD methods"):
        combine_adapters(list(pair.values()), tmp_path / "out", "cat", rank=3)
