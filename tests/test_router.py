"""Routing (infer/router.py): a probe on the base's pooled hidden states picks each prompt's adapter; the routed
prompts decode in one mixed batch and each row equals that prompt alone on its route; the router's files round-trip
bit for bit; a router that does not fit the session, its adapters or its data is refused; the CLI path end to end.

Two tiny adapters (random A and B, so each changes the answers) on the tiny Llama of `fixtures.tiny_models`, and
synthetic tasks told apart by vocabulary: "shop" prompts use shop words, "river" prompts river words, and "base"
prompts (inputs of no task) the instruction words; all three share the function words."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fixtures.tiny_models import save_tiny_llama, tiny_llama, tiny_tokenizer
from loraforge.cli import main
from loraforge.data import make_recipe, read_records
from loraforge.errors import LoraforgeError
from loraforge.infer import InferenceSession, Router, RouterData, SamplingParams, generate_many, generate_routed, \
    train_router
from loraforge.infer.router import ROUTER_META, ROUTER_WEIGHTS, prompt_features
from loraforge.lora import LoraConfig, LoraModel, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = {"shop": "coffee shop cheap food english italian restaurant pub rating high low".split(),
         "river": "river city centre family friendly near name".split(),
         "base": "yes no write describe data with".split()}
COMMON = "the a an is of to and in".split()
GREEDY = SamplingParams(max_new_tokens=4)


def _texts(task: str, n: int, seed: int) -> list[str]:
    """n prompts of 3-6 words of the task and 1-3 common words, shuffled."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = rng.choices(VOCAB[task], k=rng.randint(3, 6)) + rng.choices(COMMON, k=rng.randint(1, 3))
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    adapters = {}
    for k, name in enumerate(("shop", "river")):
        torch.manual_seed(300 + k)
        lm = LoraModel(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
        adapters[name] = save_adapter(lm, root / "adapters" / name)  # the CLI names a folder by its last part
    files = {task: _write(root / f"{task}.jsonl", [{"text": t} for t in _texts(task, 100, seed=k)])
             for k, task in enumerate(VOCAB)}
    session = InferenceSession.open(str(llama_dir), adapters)
    return session, adapters, files, root


@pytest.fixture(scope="module")
def router(setup):
    session, _, files, _ = setup
    return train_router(session, {"shop": files["shop"], "river": files["river"]}, base_data=files["base"],
                        max_examples=80, val_split=0.2, seed=0)


def _ids(session, texts: list[str]) -> list[list[int]]:
    return [list(session.tokenizer(t)["input_ids"]) for t in texts]


# ---- training, files ----------------------------------------------------------------------------------------------
def test_separable_tasks_are_routed_without_error(setup, router):
    session = setup[0]
    assert router.classes == ["shop", "river", "base"]
    assert router.accuracy == 1.0
    assert router.per_class_accuracy == {"shop": 1.0, "river": 1.0, "base": 1.0}
    # 80 of 100 records drawn per class; ceil(80 x 0.2) = 16 held out
    assert router.counts == {name: {"records": 100, "train": 64, "val": 16} for name in ("shop", "river", "base")}
    assert tuple(router.weight.shape) == (3, 32) and tuple(router.mean.shape) == (32,)
    fresh = {task: _texts(task, 8, seed=100 + k) for k, task in enumerate(VOCAB)}  # prompts it never saw
    for task, texts in fresh.items():
        assert router.route(session, _ids(session, texts)) == [None if task == "base" else task] * 8


def test_saved_router_routes_identically(setup, router, tmp_path):
    session = setup[0]
    router.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / ROUTER_META).read_text())
    assert meta["classes"] == ["shop", "river", "base"] and meta["base"] == session.base
    assert (meta["feature_dim"], meta["hidden_size"], meta["pooling"], meta["layer"]) == (32, 32, "mean", -1)
    assert meta["accuracy"] == 1.0 and meta["counts"]["river"] == {"records": 100, "train": 64, "val": 16}
    loaded = Router.load(tmp_path / "r")
    for name in ("weight", "bias", "mean", "std"):
        assert torch.equal(getattr(loaded, name), getattr(router, name)), name
    prompts = _ids(session, [t for k, task in enumerate(VOCAB) for t in _texts(task, 5, seed=200 + k)])
    assert torch.equal(loaded.probabilities(session, prompts), router.probabilities(session, prompts))  # bitwise
    assert loaded.route(session, prompts) == router.route(session, prompts)


def test_features_are_the_mean_of_the_base_hidden_states(setup):
    """Pooled over exactly the prompt's tokens, with no adapter: a batch of unequal prompts equals each alone."""
    session = setup[0]
    prompts = _ids(session, ["coffee shop", "the river near the city centre is family friendly"])
    batched = prompt_features(session, prompts)
    model = tiny_llama(0)
    for row, ids in zip(batched, prompts):
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # (T, D)
        assert torch.allclose(row, hidden.mean(0), atol=1e-5)


def test_an_early_layer_stops_the_forward_there(setup):
    """layer=1: the output of decoder layer 1 of 2, equal to the full forward's hidden_states[1]; the layers above
    it never run, which is what makes an early-layer router cheap."""
    session = setup[0]
    prompts = _ids(session, ["coffee shop", "the river near the city centre is family friendly"])
    ran = []
    with session.use(None) as model:
        handles = [block.register_forward_hook(lambda m, a, o, k=k: ran.append(k))
                   for k, block in enumerate(model.model.layers)]
    try:
        early = prompt_features(session, prompts, layer=1)
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0]  # one batch, layer 0 only
    model = tiny_llama(0)
    for row, ids in zip(early, prompts):
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # (T, D)
        assert torch.allclose(row, hidden.mean(0), atol=1e-5)
    assert not torch.allclose(early, prompt_features(session, prompts, layer=-1))


def test_recipe_prompts(setup, tmp_path):
    """A dataset read with a recipe: its prompts are `recipe.encode_prompt`, as generation is fed them; without
    --recipe, the recipe the adapter was trained with (its train_config.yaml) is used."""
    session, adapters, files, _ = setup
    records = [{"mr": t, "ref": "the " + t} for t in _texts("river", 20, seed=7)]
    e2e = _write(tmp_path / "river_e2e.jsonl", records)
    router = train_router(session, [RouterData("shop", files["shop"]), RouterData("river", e2e, recipe="e2e")],
                          max_examples=20, val_split=0.25)
    assert router.accuracy == 1.0 and router.settings["data"]["river"]["recipe"] == "e2e"
    recipe = make_recipe("e2e")
    prompts = [recipe.encode_prompt(r, session.tokenizer) for r in read_records(e2e)]
    assert router.route(session, prompts) == ["river"] * 20

    import shutil

    shutil.copytree(adapters["river"], tmp_path / "river")
    (tmp_path / "river" / "train_config.yaml").write_text("recipe: e2e\n", encoding="utf-8")
    own = InferenceSession.open(session.base, {"shop": adapters["shop"], "river": tmp_path / "river"})
    again = train_router(own, {"shop": files["shop"], "river": e2e}, max_examples=20, val_split=0.25)
    assert again.settings["data"]["river"]["recipe"] == "e2e"
    assert torch.equal(again.weight, router.weight)  # the same prompts, so the same probe


# ---- serving: the routes feed the engine ----------------------------------------------------------------------------
def test_routed_batch_rows_equal_each_prompt_alone_on_its_route(setup, router):
    session = setup[0]
    texts = [t for group in zip(*(_texts(task, 3, seed=400 + k) for k, task in enumerate(VOCAB))) for t in group]
    prompts = _ids(session, texts)  # shop, river, base, shop, ... interleaved: one mixed batch
    routes, outputs = generate_routed(session, router, prompts, GREEDY)
    assert routes == ["shop", "river", None] * 3
    for prompt, route, out in zip(prompts, routes, outputs):
        assert out == generate_many(session, [prompt], GREEDY, [route])[0]
    # the route matters: on another adapter the same prompts answer differently
    other = {"shop": "river", "river": "shop", None: "shop"}
    assert any(out != generate_many(session, [p], GREEDY, [other[r]])[0]
               for p, r, out in zip(prompts, routes, outputs))


def test_a_prompt_routed_to_base_equals_the_base_alone(setup, router):
    session = setup[0]
    prompt = _ids(session, ["write yes data with no"])[0]
    routes, outputs = generate_routed(session, router, [prompt], GREEDY)
    assert routes == [None]
    bare = InferenceSession.open(session.base)  # no adapter at all
    assert outputs[0] == generate_many(bare, [prompt], GREEDY)[0]
    assert outputs[0] != generate_many(session, [prompt], GREEDY, ["shop"])[0]


# ---- refusals -----------------------------------------------------------------------------------------------------
def test_a_router_for_another_base_is_refused(setup, router, tmp_path):
    session, adapters, _, _ = setup
    other = InferenceSession.open(str(save_tiny_llama(tmp_path / "other", seed=1)), adapters)
    with pytest.raises(LoraforgeError, match="trained on base .* this session's base is"):
        router.route(other, _ids(other, ["coffee shop"]))
    router.save(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / ROUTER_META).read_text())
    (tmp_path / "r" / ROUTER_META).write_text(json.dumps({**meta, "hidden_size": 64}))
    with pytest.raises(LoraforgeError, match="hidden size 64"):
        Router.load(tmp_path / "r").route(session, _ids(session, ["coffee shop"]))


def test_classes_that_do_not_match_the_adapters_are_refused(setup, router):
    session, adapters, _, _ = setup
    with pytest.raises(LoraforgeError, match="missing: river"):
        router.require_adapters(["shop"])
    with pytest.raises(LoraforgeError, match="not in the router: extra"):
        router.require_adapters(["shop", "river", "extra"])
    one = InferenceSession.open(session.base, {"shop": adapters["shop"]})
    with pytest.raises(LoraforgeError, match="no adapter named 'river'"):
        generate_routed(one, router, _ids(one, ["coffee shop"]), GREEDY)


def test_data_for_an_unknown_adapter_is_refused(setup):
    session, _, files, _ = setup
    with pytest.raises(LoraforgeError, match="data for 'nope', but no adapter of that name is loaded"):
        train_router(session, {"shop": files["shop"], "nope": files["river"]})
    with pytest.raises(LoraforgeError, match="at least two classes"):
        train_router(session, {"shop": files["shop"]})


def test_damaged_router_files_are_refused(router, tmp_path):
    router.save(tmp_path / "r")
    (tmp_path / "r" / ROUTER_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(LoraforgeError, match="cannot read the router"):
        Router.load(tmp_path / "r")
    with pytest.raises(LoraforgeError, match="not a router folder"):
        Router.load(tmp_path / "nothing")


# ---- the command --------------------------------------------------------------------------------------------------
def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("loraforge: error: "), lines
    return lines[-1]


def test_cli_router_then_generate_with_it(setup, llama_dir, tmp_path, capsys):
    session, adapters, files, _ = setup
    out = tmp_path / "router"
    flags = ["--model", str(llama_dir), "--adapter", str(adapters["shop"]), "--adapter", str(adapters["river"])]
    rc = main(["router", *flags, "--data", f"shop={files['shop']}", "--data", f"river={files['river']}",
               "--base-data", str(files["base"]), "--max-examples", "80", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "classes shop, river, base; 192 prompts trained on, 48 held out" in printed
    assert "validation accuracy 1.0000; per class: shop 1.0000 (16), river 1.0000 (16), base 1.0000 (16)" in printed
    assert json.loads((out / ROUTER_META).read_text())["accuracy"] == 1.0

    prompt = "the river near the city centre"
    rc = main(["generate", "--router", str(out), *flags, "--prompt", prompt, "--max-new-tokens", "4"])
    assert rc == 0
    head, text = capsys.readouterr().out.rstrip("\n").split("\n")
    ids = _ids(session, [prompt])
    expected = session.tokenizer.decode(generate_many(session, ids, GREEDY, ["river"])[0], skip_special_tokens=True)
    assert head.startswith("[river p=") and text == expected.strip()


def test_cli_refusals_exit_2(setup, llama_dir, router, tmp_path, capsys):
    _, adapters, files, _ = setup
    shop, river = str(adapters["shop"]), str(adapters["river"])
    base = ["--model", str(llama_dir)]
    rc = main(["router", *base, "--adapter", shop, "--adapter", river, "--data", f"shop={files['shop']}",
               "--data", f"river={files['river']}", "--data", f"nope={files['base']}", "--output", str(tmp_path / "x")])
    assert rc == 2 and "data for 'nope', but no adapter of that name is loaded" in _error(capsys)
    rc = main(["router", *base, "--adapter", shop, "--adapter", river, "--data", f"shop={files['shop']}",
               "--output", str(tmp_path / "x")])
    assert rc == 2 and "no --data for adapter river" in _error(capsys)
    rc = main(["router", *base, "--adapter", shop, "--data", "shop", "--output", str(tmp_path / "x")])
    assert rc == 2 and "--data 'shop': write it as NAME=FILE" in _error(capsys)

    router.save(tmp_path / "r")
    rc = main(["generate", "--router", str(tmp_path / "r"), *base, "--adapter", shop, "--prompt", "coffee"])
    assert rc == 2 and "missing: river" in _error(capsys)
    other = save_tiny_llama(tmp_path / "other", seed=1)
    rc = main(["generate", "--router", str(tmp_path / "r"), "--model", str(other), "--adapter", shop,
               "--adapter", river, "--prompt", "coffee"])
    assert rc == 2 and "trained on base" in _error(capsys)
