"""Adapters travel: one trained here loads from anywhere (by PEFT through the folder it records, by loraforge through
its alias when that folder is gone), its files are readable by another user as the umask allows, and `merge` writes
the dtype asked for."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from loraforge.config import TrainConfig
from loraforge.models import BASE_FILE, adapter_base, load_model
from loraforge.train import train
from tolerances import FP32, max_abs_diff

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(llama_dir, data_file, tmp_path_factory):
    old = os.umask(0o022)
    try:
        out = tmp_path_factory.mktemp("travel") / "adapter"
        train(TrainConfig(model=str(llama_dir), data=str(data_file), output=str(out), max_steps=2, batch_size=2,
                          r=2, lora_alpha=4, lr=5e-2, dtype="float32"), progress=False)
    finally:
        os.umask(old)
    return out


def test_the_adapter_records_a_folder_peft_opens_and_the_bases_hash(trained, llama_dir, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from loraforge.lora import load_adapter

    config = json.loads((trained / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert Path(config["base_model_name_or_path"]).resolve() == llama_dir.resolve()
    record = json.loads((trained / BASE_FILE).read_text())
    assert record["alias"] == str(llama_dir) and len(record["sha256"]) == 64
    monkeypatch.chdir(tmp_path)  # anywhere: PEFT finds the base from the adapter alone
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(trained)).eval()
    ours, _ = load_model(str(llama_dir))
    load_adapter(ours, trained)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert max_abs_diff(peft_model(input_ids=ids).logits, ours(input_ids=ids).logits) <= FP32


def test_a_built_in_alias_wins_and_a_missing_folder_falls_back_to_it(trained, tmp_path):
    moved = shutil.copytree(trained, tmp_path / "moved")
    assert adapter_base(moved) == json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"]
    record = json.loads((moved / BASE_FILE).read_text())
    (moved / BASE_FILE).write_text(json.dumps({**record, "alias": "smollm2-135m-instruct"}))
    assert adapter_base(moved) == "smollm2-135m-instruct"  # portable: found on any machine
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/nowhere/base"}))
    (moved / BASE_FILE).write_text(json.dumps({**record, "alias": "runs/base"}))
    assert adapter_base(moved) == "runs/base"  # the folder is gone here: the name it was given


def test_files_follow_the_umask(trained):
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_config.yaml", BASE_FILE):
        assert (trained / name).stat().st_mode & 0o777 == 0o644, name


def test_merge_writes_the_dtype_asked_for(trained, tmp_path):
    from loraforge.cli import main

    sizes = {}
    for dtype in ("bfloat16", "auto"):  # auto: the base's own, float32 for the tiny base
        out = tmp_path / dtype
        old = os.umask(0o022)
        try:
            assert main(["merge", "--adapter", str(trained), "--output", str(out), "--dtype", dtype]) == 0
        finally:
            os.umask(old)
        assert json.loads((out / "config.json").read_text())["dtype"] == ("bfloat16" if dtype == "bfloat16" else
                                                                          "float32")
        weights = out / "model.safetensors"
        assert weights.stat().st_mode & 0o777 == 0o644 and out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
        sizes[dtype] = weights.stat().st_size
        load_model(str(out))  # loads back
    assert sizes["bfloat16"] < 0.6 * sizes["auto"]
