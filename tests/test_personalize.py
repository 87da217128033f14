"""Per-user adapters: `train --per-user`, the adapter store (names, LRU under a cap, refusals), `generate --adapters`,
system prompts kept with an adapter, repeated flags, and Hub ids from the local cache."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.tiny_models import RECORDS, save_tiny_gpt2, write_jsonl
from loraforge.cli import main
from loraforge.data.chat import CHATML_TEMPLATE, SYSTEM_PROMPT_FILE
from loraforge.errors import LoraforgeError
from loraforge.infer import InferenceSession
from loraforge.infer.store import AdapterStore, check_name
from loraforge.models import load_model, resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")
USERS = ("alice", "bob", "carol")
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--r", "2", "--lora-alpha", "4", "--lr", "1e-2", "--seed", "0",
         "--dtype", "float32", "--max-length", "32", "--target-modules", "q_proj,v_proj", "--lora-dropout", "0"]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("loraforge: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def store(llama_dir, tmp_path_factory) -> Path:
    """`train --per-user user` on records of three users (alice 2, bob 1, carol 2 records)."""
    root = tmp_path_factory.mktemp("per_user")
    records = [dict(r, user=USERS[i % 3]) for i, r in enumerate(RECORDS)]
    data = write_jsonl(root / "train.jsonl", records)
    out = root / "store"
    assert main(["-q", "train", "--model", str(llama_dir), "--data", str(data), "--per-user", "user",
                 "--output", str(out), *TRAIN]) == 0
    return out


def test_per_user_trains_one_adapter_each_from_its_own_records(store, llama_dir):
    assert sorted(p.name for p in store.iterdir()) == sorted(USERS)
    counts = {"alice": 2, "bob": 2, "carol": 1}  # records 0,3 / 1,4 / 2
    weights = {}
    for user in USERS:
        summary = json.loads((store / user / "train_summary.json").read_text())
        assert summary["data"]["records_read"] == counts[user] and summary["steps"] == 2
        weights[user] = load_file(store / user / "adapter_model.safetensors")
        config = json.loads((store / user / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(llama_dir) and config["r"] == 2
    key = next(k for k in weights["alice"] if "lora_B" in k)
    assert not torch.equal(weights["alice"][key], weights["bob"][key])


def test_per_user_loads_the_base_once(llama_dir, tmp_path, monkeypatch):
    import loraforge.train.loop as loop  # train_per_user loads through loop.load_model

    calls = []
    real = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    records = [dict(r, user=USERS[i % 3]) for i, r in enumerate(RECORDS)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    assert main(["-q", "train", "--model", str(llama_dir), "--data", str(data), "--per-user", "user",
                 "--output", str(tmp_path / "o"), *TRAIN]) == 0
    assert len(calls) == 1


def test_per_user_value_that_escapes_the_folder_exits_2(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [dict(RECORDS[0], user="../evil")])
    assert main(["train", "--model", str(llama_dir), "--data", str(data), "--per-user", "user",
                 "--output", str(tmp_path / "o"), *TRAIN]) == 2
    assert "'../evil' cannot name an adapter folder" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a..b", "-lead", "a b", "/abs"])
def test_names_that_could_escape_are_rejected(name):
    with pytest.raises(LoraforgeError, match="not allowed"):
        check_name(name)


def test_valid_names_pass():
    for name in ("alice", "user_1.v2", "A-9", "x" * 64):
        assert check_name(name) == name


# ---- the store --------------------------------------------------------------------------------------------------
def test_lru_eviction_respects_the_count_and_memory_caps(store, llama_dir):
    session = InferenceSession.open(str(llama_dir))
    lru = AdapterStore(store, session, max_resident=2)
    assert lru.names() == sorted(USERS)
    lru.ensure(["alice"])
    lru.ensure(["bob"])
    lru.ensure(["alice"])  # alice is now the most recent
    lru.ensure(["carol"])  # bob, the least recent, goes
    assert list(lru.resident) == ["alice", "carol"] and set(session.adapters) == {"alice", "carol"}
    lru.ensure(["bob"], pinned=["alice"])  # alice is in use: carol goes instead
    assert list(lru.resident) == ["alice", "bob"]
    with pytest.raises(LoraforgeError, match="every resident adapter is in use"):
        lru.ensure(["carol"], pinned=["alice", "bob"])

    one = lru.resident["alice"]  # bytes of one adapter (all three have the same shapes)
    by_mb = AdapterStore(store, InferenceSession.open(str(llama_dir)), max_resident_mb=2.5 * one / 2**20)
    for user in (*USERS, "alice"):
        by_mb.ensure([user])
        assert by_mb.resident_bytes <= by_mb.cap_bytes
    assert list(by_mb.resident) == ["carol", "alice"]
    tiny_cap = AdapterStore(store, InferenceSession.open(str(llama_dir)), max_resident_mb=0.5 * one / 2**20)
    with pytest.raises(LoraforgeError, match="more than the whole resident cap"):
        tiny_cap.ensure(["bob"])


def test_store_unknown_and_escaping_names(store, llama_dir):
    lru = AdapterStore(store, InferenceSession.open(str(llama_dir)))
    with pytest.raises(LoraforgeError, match="no adapter named 'dave'"):
        lru.ensure(["dave"])
    with pytest.raises(LoraforgeError, match="not allowed"):
        lru.ensure(["../store/alice"])


def test_generate_from_the_store_answers_each_adapter_in_one_batch(store, llama_dir, capsys):
    flags = ["--model", str(llama_dir), "--prompt", "the pub", "--max-new-tokens", "5"]
    assert main(["generate", "--adapters", str(store), "--adapter", "alice", "--adapter", "bob", *flags]) == 0
    both = capsys.readouterr().out
    alone = {}
    for user in ("alice", "bob"):
        assert main(["generate", "--adapter", str(store / user), *flags]) == 0
        alone[user] = capsys.readouterr().out.strip()
    assert both == f"[alice]\n{alone['alice']}\n\n[bob]\n{alone['bob']}\n\n"
    assert alone["alice"] != alone["bob"]


def test_corrupt_or_foreign_adapters_exit_2(store, llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad_store"
    shutil.copytree(store, bad)
    (bad / "bob" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    flags = ["--model", str(llama_dir), "--prompt", "the", "--max-new-tokens", "2"]
    assert main(["generate", "--adapters", str(bad), "--adapter", "bob", *flags]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "bob/adapter_model.safetensors: not a readable safetensors file" in err

    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    assert main(["-q", "train", "--model", str(gpt2), "--data", str(write_jsonl(tmp_path / "d.jsonl")),
                 "--output", str(bad / "foreign"), "--max-steps", "1", "--r", "2", "--dtype", "float32"]) == 0
    assert main(["generate", "--adapters", str(bad), "--adapter", "foreign", *flags]) == 2
    err = _error_line(capsys.readouterr().err)
    assert f"made for {gpt2}" in err and "another architecture" in err


# ---- repeated flags: several adapters, or an error; never last-one-wins -------------------------------------------
def test_repeated_adapter_flags(store, llama_dir, tmp_path, capsys):
    two = ["--adapter", str(store / "alice"), "--adapter", str(store / "bob")]
    assert main(["merge", *two, "--output", str(tmp_path / "m")]) == 2
    assert "--adapter was given 2 times" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "m").exists()
    assert main(["predict", *two, "--recipe", "sst2", "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "--adapter was given 2 times" in _error_line(capsys.readouterr().err)


# ---- system prompts -----------------------------------------------------------------------------------------------
def test_one_system_prompt_is_kept_with_the_adapter_and_used(llama_dir, tmp_path, capsys, monkeypatch):
    chat_dir = tmp_path / "chat_llama"
    shutil.copytree(llama_dir, chat_dir)
    _, tokenizer = load_model(str(chat_dir))
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    system = "you describe a restaurant"
    chats = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": "the pub"},
                           {"role": "assistant", "content": "the pub is near the river"}]}] * 3
    out = tmp_path / "adapter"
    assert main(["-q", "train", "--model", str(chat_dir), "--data", str(write_jsonl(tmp_path / "c.jsonl", chats)),
                 "--output", str(out), *TRAIN]) == 0
    assert json.loads((out / SYSTEM_PROMPT_FILE).read_text()) == {"system": system}

    import loraforge.cli as cli

    seen = []
    real = cli.prompt_ids
    monkeypatch.setattr(cli, "prompt_ids", lambda tok, p, chat, system=None: seen.append(system) or real(tok, p, chat,
                                                                                                       system))
    assert main(["generate", "--adapter", str(out), "--chat", "--prompt", "the pub", "--max-new-tokens", "2"]) == 0
    assert main(["generate", "--adapter", str(out), "--chat", "--system", "be brief", "--prompt", "the pub",
                 "--max-new-tokens", "2"]) == 0
    assert seen == [system, "be brief"]
    ids = real(tokenizer, "the pub", True, system)
    assert tokenizer.decode(ids).count("restaurant") == 1  # the system turn is in the prompt

    mixed = [dict(c, messages=[{"role": "system", "content": f"s{i}"}, *c["messages"][1:]]) for i, c in enumerate(chats)]
    out2 = tmp_path / "adapter2"
    assert main(["-q", "train", "--model", str(chat_dir), "--data", str(write_jsonl(tmp_path / "m.jsonl", mixed)),
                 "--output", str(out2), *TRAIN]) == 0
    assert not (out2 / SYSTEM_PROMPT_FILE).exists()  # several system prompts: none is the default


# ---- Hub ids, from the local cache only ---------------------------------------------------------------------------
def test_hub_ids_resolve_from_the_local_cache(llama_dir, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hub"
    snapshot = cache / "models--Owner--Tiny" / "snapshots" / "abc123"
    shutil.copytree(llama_dir, snapshot)
    (cache / "models--Owner--Tiny" / "refs").mkdir()
    (cache / "models--Owner--Tiny" / "refs" / "main").write_text("abc123")
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model("Owner/Tiny") == snapshot
    model, _ = load_model("Owner/Tiny")
    assert model.config.num_hidden_layers == 2
    assert main(["generate", "--model", "Owner/Absent", "--prompt", "the"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "'Owner/Absent' is not in the local Hugging Face cache" in err and str(cache) in err


def test_device_flag_is_checked(llama_dir, capsys):
    flags = ["generate", "--model", str(llama_dir), "--prompt", "the", "--max-new-tokens", "2"]
    assert main([*flags, "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main([*flags, "--device", "tpu"]) == 2
    assert "--device 'tpu': use auto, cpu, cuda or cuda:N" in _error_line(capsys.readouterr().err)
    if not torch.cuda.is_available():
        assert main([*flags, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in _error_line(capsys.readouterr().err)
