"""The decode-step engine (infer/engine.py): requests on different adapters, joining mid-flight, give the tokens each
gives alone (transformers' generate on the training layer, and PEFT's `adapter_names=` mixed batches); sampling
is per request and seeded, never the global RNG; stops and limits end rows."""
from __future__ import annotations

import os

import peft
import pytest
import torch

from fixtures.tiny_models import EOS, tiny_tokenizer
from helpers import hf_generate, session_of, tiny_bert_cls, tiny_gpt2, tiny_llama, token_ids
from loraforge.errors import LoraforgeError
from loraforge.infer import Engine, Request, SamplingParams
from loraforge.lora import LoraConfig, LoraModel, load_adapter, save_adapter
from loraforge.lora.adapter import read_adapter
from loraforge.lora.multi import MultiLoraModel
from tolerances import FP32, max_abs_diff

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def served(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"engine_{kind}")
    folders = {}
    for k, r in enumerate((2, 4, 3)):
        torch.manual_seed(200 + k)
        lm = LoraModel(BUILDERS[kind](), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[kind],
                                                    init_lora_weights=False))
        folders[f"u{k}"] = save_adapter(lm, root / f"u{k}")
    return kind, folders


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (int(k),), generator=gen).tolist() for k in torch.randint(1, 12, (n,), generator=gen)]


def _alone(kind: str, folder, prompt: list[int], n: int) -> list[int]:
    model = BUILDERS[kind]()
    if folder is not None:
        load_adapter(model, folder)
    return hf_generate(model, tiny_tokenizer(), prompt, n)


def test_requests_joining_mid_flight_equal_each_alone(served):
    kind, folders = served
    session = session_of(BUILDERS[kind](), tiny_tokenizer(), **folders)
    engine = Engine(session, max_batch=3)
    prompts = _prompts(7)
    adapters = ["u0", None, "u1", "u2", "u2", None, "u0"]
    requests = [Request(p, a, SamplingParams(max_new_tokens=5 + i)) for i, (p, a) in enumerate(zip(prompts, adapters))]
    engine.submit(requests[0])
    engine.step()
    engine.step()  # request 0 is two tokens in when the others arrive, and only 3 rows fit at once
    for r in requests[1:]:
        engine.submit(r)
    finished = []
    while engine.has_work:
        assert len(engine.rows) <= 3
        finished += engine.step()
    assert sorted(r.id for r in finished) == sorted(r.id for r in requests)
    for r in requests:
        folder = folders[r.adapter] if r.adapter else None
        assert r.output_ids == _alone(kind, folder, r.prompt_ids, r.params.max_new_tokens), r.adapter
        assert r.finish_reason == ("stop" if r.output_ids[-1] == EOS else "length")


def test_a_shared_prefix_runs_once_per_adapter_and_rows_equal_each_alone(served, monkeypatch):
    """Prompts that share a prefix (a few-shot prompt's examples): the prefix runs once per adapter, each row
    prefills only its rest, and every row gives the tokens it gives alone."""
    import loraforge.infer.engine as engine_module
    from loraforge.infer import generate_many

    kind, folders = served
    session = session_of(BUILDERS[kind](), tiny_tokenizer(), **folders)
    prefix = _prompts(1, seed=9)[0] * 3  # 3 to 33 tokens
    prompts = [prefix + rest for rest in _prompts(6)] + [prefix[:1]]  # the last starts with the prefix's first token
    adapters = ["u0", None, "u1", "u0", None, "u2", "u1"]
    engine = Engine(session, max_batch=2, prefix=prefix)
    ran, real = [], engine._prefix_kv

    def prefix_kv(adapter):
        if adapter not in engine.prefix_kv:
            ran.append(adapter)  # the prefix runs on this adapter now
        return real(adapter)

    monkeypatch.setattr(engine, "_prefix_kv", prefix_kv)
    requests = engine.run([Request(p, a, SamplingParams(max_new_tokens=6)) for p, a in zip(prompts, adapters)])
    assert {"u0", None} <= set(ran) and len(ran) == len(set(ran)) == len(engine.prefix_kv)  # once per adapter
    for r in requests:
        folder = folders[r.adapter] if r.adapter else None
        assert r.output_ids == _alone(kind, folder, r.prompt_ids, 6), r.adapter
    # generate_many finds the shared prefix itself when it is long enough
    monkeypatch.setattr(engine_module, "SHARED_PREFIX_MIN", 2)
    assert engine_module.shared_prefix(prompts[:6]) == len(prefix) + len(os.path.commonprefix(_prompts(6))) - 1
    assert generate_many(session, prompts[:6], SamplingParams(max_new_tokens=6), adapters[:6], max_batch=4) \
        == [r.output_ids for r in requests[:6]]


def test_greedy_mixed_batch_equals_peft_adapter_names(served):
    """PEFT's own mixed-batch inference (`generate(adapter_names=...)`) picks the same greedy tokens."""
    kind, folders = served
    model = peft.PeftModel.from_pretrained(BUILDERS[kind](), str(folders["u0"]), adapter_name="u0")
    for name in ("u1", "u2"):
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.eval()
    prompts = [[7, 21, 40, 13, 55, 8]] * 4  # one prompt: PEFT's batch needs no padding, rows differ by adapter
    names = ["u0", "u1", "__base__", "u2"]
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             adapter_names=names, pad_token_id=0, eos_token_id=None)
    theirs = out[:, ids.shape[1]:].tolist()
    session = session_of(BUILDERS[kind](), tiny_tokenizer(), **folders)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    ours = Engine(session).run([Request(p, None if n == "__base__" else n, params) for p, n in zip(prompts, names)])
    assert [r.output_ids for r in ours] == theirs
    assert len({tuple(t) for t in theirs}) > 1  # the adapters differ, so the rows do


def test_sampling_is_per_request_and_seeded(served):
    kind, folders = served
    session = session_of(BUILDERS[kind](), tiny_tokenizer(), **folders)
    prompt = _prompts(1, seed=11)[0]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=20, seed=7, ignore_eos=True)
    rng = torch.random.get_rng_state()
    alone = Engine(session).run([Request(prompt, "u1", sampled)])[0].output_ids
    crowd = [Request(p, a, SamplingParams(max_new_tokens=9, temperature=1.0, seed=i))
             for i, (p, a) in enumerate(zip(_prompts(4, seed=12), ["u0", None, "u2", "u1"]))]
    mixed = Engine(session, max_batch=8).run([crowd[0], Request(prompt, "u1", sampled), *crowd[1:]])[1].output_ids
    assert mixed == alone  # batch-mates do not change a seeded request's draws
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG was never used
    other = SamplingParams(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=20, seed=8, ignore_eos=True)
    assert Engine(session).run([Request(prompt, "u1", other)])[0].output_ids != alone
    top1 = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=1, seed=3)
    greedy = SamplingParams(max_new_tokens=8)
    one, two = Engine(session).run([Request(prompt, "u2", top1), Request(prompt, "u2", greedy)])
    assert one.output_ids == two.output_ids


def test_top_p_keeps_the_smallest_set_reaching_p():
    from loraforge.infer.engine import _sample

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    gen = torch.Generator().manual_seed(0)
    draws = {_sample(logits, params, gen) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut


def test_stop_tokens_and_limits(served):
    kind, folders = served
    session = session_of(BUILDERS[kind](), tiny_tokenizer(), **folders)
    prompt = _prompts(1, seed=13)[0]
    free = Engine(session).run([Request(prompt, "u0", SamplingParams(max_new_tokens=10, ignore_eos=True))])[0]
    stop_at = free.output_ids[3]
    stopped = Engine(session).run([Request(prompt, "u0", SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                                        stop_token_ids=(stop_at,)))])[0]
    first = free.output_ids.index(stop_at)
    assert stopped.output_ids == free.output_ids[:first + 1] and stopped.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.output_ids) == 10


def test_bad_requests_are_refused(served):
    kind, folders = served
    session = session_of(BUILDERS[kind](), tiny_tokenizer(), **folders)
    engine = Engine(session)
    with pytest.raises(LoraforgeError, match="empty"):
        engine.submit(Request([], None))
    with pytest.raises(LoraforgeError, match="no adapter named 'nobody'"):
        engine.submit(Request([5], "nobody"))
    with pytest.raises(LoraforgeError, match="exceeds the model's context of 64 tokens"):
        engine.submit(Request([5] * 60, None, SamplingParams(max_new_tokens=10)))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0)):
        with pytest.raises(LoraforgeError):
            SamplingParams(**bad)
    assert not engine.has_work


# ---- classifier heads: a copy of the head per adapter, chosen per row ---------------------------------------------
def test_head_adapters_in_one_mixed_batch_equal_each_alone(tmp_path):
    folders = {}
    for k in range(2):
        torch.manual_seed(300 + k)
        lm = LoraModel(tiny_bert_cls(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS", init_lora_weights=False))
        with torch.no_grad():
            for p in lm.saved_modules["classifier"].modules_to_save.parameters():
                p.normal_()
        folders[f"h{k}"] = save_adapter(lm, tmp_path / f"h{k}")
    multi = MultiLoraModel(tiny_bert_cls())
    for name, folder in folders.items():
        multi.add(name, read_adapter(folder))
    names = ["h1", None, "h0", "h1"]
    ids = token_ids(4, 6, seed=8)
    multi.route(names)
    with torch.no_grad():
        mixed = multi.model(input_ids=ids).logits  # (4, labels)
        base = tiny_bert_cls()(input_ids=ids).logits
    for i, name in enumerate(names):
        if name is None:
            assert max_abs_diff(mixed[i], base[i]) <= FP32
            continue
        alone = load_adapter(tiny_bert_cls(), folders[name]).model
        with torch.no_grad():
            assert max_abs_diff(mixed[i], alone(input_ids=ids[i:i + 1]).logits[0]) <= FP32


# ---- the written-out decode step (infer/decode.py) ----------------------------------------------------------------
@pytest.mark.parametrize("kernels", ["1", "0"])  # the C++ RMSNorm/rotary/SGMV (csrc/), or torch ops without a compiler
def test_decode_step_equals_transformers_forward(tmp_path, kernels, monkeypatch):
    """Same cache, same left-padded rows, a mix of adapters: decode_step's logits are transformers' forward's."""
    monkeypatch.setenv("LORAFORGE_KERNELS", kernels)
    from fixtures.tiny_models import tiny_llama as gqa_llama  # 4 heads, 2 KV heads: grouped-query attention
    from loraforge.infer.decode import decode_step, supports
    from loraforge.infer.engine import GrowingLayer, cache_keyword

    torch.manual_seed(0)
    folder = save_adapter(LoraModel(gqa_llama(), LoraConfig(r=2, target_modules="all-linear",
                                                            init_lora_weights=False)), tmp_path / "a")
    session = session_of(gqa_llama(), tiny_tokenizer(), a=folder)
    model = session.model
    assert supports(model) and not supports(tiny_gpt2())
    ids = torch.tensor([[0, 0, 5, 9, 12], [7, 8, 9, 10, 11], [0, 0, 0, 4, 6]])  # (3, 5), left-padded with pad 0
    mask = (torch.arange(5) >= torch.tensor([[2], [0], [3]])).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    session.route(["a", None, "a"])
    from transformers import DynamicCache

    kw = cache_keyword(model)
    caches = []
    for _ in range(2):
        cache = DynamicCache(config=model.config)
        cache.layers = [GrowingLayer() for _ in cache.layers]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{kw: cache})
        caches.append(cache)
    new = torch.tensor([[3], [14], [21]])
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    pos = positions[:, -1:] + 1
    ours = decode_step(model, new, pos, mask2, caches[0])
    with torch.no_grad():
        theirs = model(input_ids=new, attention_mask=mask2, position_ids=pos, use_cache=True,
                       **{kw: caches[1]}).logits[:, -1]
    assert max_abs_diff(ours, theirs) <= FP32
    assert max_abs_diff(caches[0].layers[1].keys, caches[1].layers[1].keys) <= FP32
