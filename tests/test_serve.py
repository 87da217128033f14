"""The OpenAI-compatible server (`loraforge serve`), checked with the official `openai` client on 127.0.0.1: models,
completions, chat, streaming, every error in OpenAI's shape, runtime adapter loads and replacements, cancellation,
and a graceful stop on SIGTERM. Greedy answers must be token for token what `loraforge generate --greedy` gives."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from fixtures.tiny_models import save_tiny_llama
from loraforge.cli import main
from loraforge.data.chat import CHATML_TEMPLATE
from loraforge.infer import InferenceSession, SamplingParams
from loraforge.infer.store import AdapterStore
from loraforge.lora import LoraConfig, LoraModel, save_adapter
from loraforge.models import load_model
from loraforge.options import ServeOptions
from loraforge.serve import create_app
from loraforge.serve.main import bind
from loraforge.serve.worker import EngineWorker, Job

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-test-key"
PROMPT = "the pub near the river is"


def _adapter(model_dir: Path, folder: Path, seed: int, r: int = 2) -> Path:
    model, _ = load_model(str(model_dir))
    torch.manual_seed(seed)
    lm = LoraModel(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                                     base_model_name_or_path=str(model_dir)))
    with torch.no_grad():
        for name, p in lm.adapter_parameters().items():
            p.mul_(8.0)  # adapters that change the greedy text, so a mix-up would show
    return save_adapter(lm, folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_llama(root / "model", seed=0)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHATML_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    store = root / "store"
    for k, name in enumerate(("alice", "bob", "carol")):
        _adapter(model_dir, store / name, seed=10 + k, r=2 + k)
    _adapter(model_dir, root / "spare" / "dave", seed=20)
    _adapter(model_dir, root / "spare" / "alice_v2", seed=30)
    return model_dir, store, root


class Live:
    """`create_app` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, model_dir: Path, store: Path | None, **settings):
        self.session = InferenceSession.open(str(model_dir))
        self.store = AdapterStore(store, self.session) if store else None
        self.app = create_app(self.session, self.store, ServeOptions(model="tiny", **settings))
        self.worker: EngineWorker = self.app.state.worker
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(world):
    model_dir, store, _ = world
    server = Live(model_dir, store, api_key=KEY, max_tokens_cap=64, max_body_kb=4)
    yield server
    server.stop()


def _generate(model_dir: Path, store: Path, adapter: str | None, capsys, chat: bool = False, n: int = 12) -> str:
    args = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", str(n), "--greedy"]
    if adapter:
        args += ["--adapters", str(store), "--adapter", adapter]
    assert main(args + (["--chat"] if chat else [])) == 0
    return capsys.readouterr().out.strip()


def test_models_lists_the_base_and_every_adapter_with_its_parent(live):
    models = {m.id: m for m in live.client().models.list().data}
    assert sorted(models) == ["alice", "bob", "carol", "tiny"]
    assert models["alice"].parent == "tiny" and models["tiny"].parent is None


def test_greedy_completions_and_chat_equal_loraforge_generate(live, world, capsys):
    model_dir, store, _ = world
    client = live.client()
    answers = set()
    for name in ("alice", "bob", None):
        want = _generate(model_dir, store, name, capsys)
        got = client.completions.create(model=name or "tiny", prompt=PROMPT, max_tokens=12, temperature=0)
        assert got.choices[0].text.strip() == want
        assert got.usage.prompt_tokens == len(live.session.tokenizer(PROMPT)["input_ids"])
        assert got.usage.completion_tokens == 12 or got.choices[0].finish_reason == "stop"
        chat_want = _generate(model_dir, store, name, capsys, chat=True)
        chat = client.chat.completions.create(model=name or "tiny", messages=[{"role": "user", "content": PROMPT}],
                                              max_tokens=12, temperature=0)
        assert chat.choices[0].message.content.strip() == chat_want
        assert chat.choices[0].finish_reason in ("stop", "length")
        answers.add(want)
    assert len(answers) == 3  # the adapters really differ, so the checks above can tell them apart


def test_concurrent_requests_on_mixed_adapters_each_get_their_own_answer(live, world, capsys):
    model_dir, store, _ = world
    names = ["alice", "bob", "carol", None] * 4
    want = {name: _generate(model_dir, store, name, capsys) for name in set(names)}
    client = live.client()

    def ask(name):
        return client.completions.create(model=name or "tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, names))
    assert [g.choices[0].text.strip() for g in got] == [want[n] for n in names]


def test_streaming_equals_the_whole_answer_and_reports_usage(live):
    client = live.client()
    whole = client.chat.completions.create(model="bob", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="bob", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=16, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    plain = list(client.completions.create(model="bob", prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in plain) == client.completions.create(
        model="bob", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text


def test_stop_strings_cut_the_text_before_them(live):
    client = live.client()
    full = client.completions.create(model="alice", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3
    stop = " " + words[2]
    cut = client.completions.create(model="alice", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="alice", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_repeats_and_n_gives_choices(live):
    client = live.client()
    kw = dict(model="carol", prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7)
    first, again = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert first == again
    many = client.completions.create(**kw, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].text == first


def test_errors_come_back_in_openai_shape(live):
    client = live.client()
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nobody", prompt=PROMPT, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    for escape in ("../store/alice", "/etc/passwd", ".hidden"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=escape, prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt=PROMPT, max_tokens=65)
    assert "cap of 64" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt="the " * 250, max_tokens=20)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt=PROMPT, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="alice", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alice", prompt=PROMPT, logprobs=2)
    assert e.value.body["param"] == "logprobs"
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="alice", prompt="the " * 1200, max_tokens=4)  # a 5 kB body, cap 4 kB
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    chunked = httpx.post(live.url + "/v1/completions", headers=headers, content=iter([b"x" * 3000] * 2))
    assert chunked.status_code == 413
    bad = httpx.post(live.url + "/v1/completions", headers=headers, content=b"{not json")
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_queue_answers_429_with_retry_after(world):
    model_dir, store, _ = world
    server = Live(model_dir, store, max_batch=1, max_queue=2)
    try:
        hold = threading.Event()
        server.worker.call(hold.wait)  # the engine thread waits: nothing leaves the queue
        client = server.client()
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(client.completions.create, model="tiny", prompt=PROMPT, max_tokens=3,
                                   temperature=0) for _ in range(2)]
            while server.worker.stats()["queue_depth"] < 2:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
            assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "queue_full"
            hold.set()
            assert all(p.result().choices[0].finish_reason for p in pending)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'loraforge_responses_total{code="429"} 1' in metrics and "loraforge_queue_depth 0" in metrics
    finally:
        server.stop()


def test_admin_loads_replaces_and_unloads_adapters_at_runtime(live, world, capsys):
    model_dir, store, root = world
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(live.url + "/admin/adapters/dave/load").status_code == 401
    assert httpx.post(live.url + "/admin/adapters/dave/load", headers=headers).status_code == 404
    shutil.copytree(root / "spare" / "dave", store / "dave")
    try:
        loaded = httpx.post(live.url + "/admin/adapters/dave/load", headers=headers)
        assert loaded.status_code == 200 and loaded.json()["bytes"] > 0
        got = live.client().completions.create(model="dave", prompt=PROMPT, max_tokens=12, temperature=0)
        assert got.choices[0].text.strip() == _generate(model_dir, store, "dave", capsys)
        before = got.choices[0].text
        shutil.rmtree(store / "dave")
        shutil.copytree(root / "spare" / "alice_v2", store / "dave")  # new weights under the same name
        assert httpx.post(live.url + "/admin/adapters/dave/replace", headers=headers).status_code == 200
        after = live.client().completions.create(model="dave", prompt=PROMPT, max_tokens=12, temperature=0)
        assert after.choices[0].text.strip() == _generate(model_dir, store, "dave", capsys) != before.strip()
        assert httpx.delete(live.url + "/admin/adapters/dave", headers=headers).status_code == 200
        assert "dave" not in live.store.current
        (store / "dave" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
        broken = httpx.post(live.url + "/admin/adapters/dave/load", headers=headers)
        assert broken.status_code == 400 and "dave" in broken.json()["error"]["message"]
    finally:
        shutil.rmtree(store / "dave", ignore_errors=True)


def test_admin_routes_are_off_without_a_key(world):
    model_dir, store, _ = world
    server = Live(model_dir, store)
    try:
        assert server.client(key=None).models.list().data  # open on loopback without a key
        response = httpx.post(server.url + "/admin/adapters/alice/load")
        assert response.status_code == 403 and "--api-key" in response.json()["error"]["message"]
    finally:
        server.stop()


def test_replacing_an_adapter_never_changes_a_request_in_flight(world):
    """Driven step by step on the test's thread: a request decoding on alice keeps alice's old weights after a
    replace; one submitted after it gets the new ones; the old weights go once nothing uses them."""
    model_dir, store, root = world
    run = root / "replace_store"
    shutil.copytree(store, run)
    session = InferenceSession.open(str(model_dir))
    adapters = AdapterStore(run, session)
    worker = EngineWorker(session, adapters, max_batch=4)  # never started: the test steps it
    prompt = session.tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)

    def alone(folder: Path) -> list[int]:
        from loraforge.infer import generate_many
        return generate_many(InferenceSession.open(str(model_dir), {"x": folder}), [prompt], params, ["x"])[0]
    old_ids, new_ids = alone(store / "alice"), alone(root / "spare" / "alice_v2")
    assert old_ids != new_ids
    events: list = []
    first = worker.submit(Job(prompt, "alice", params, events.append))
    worker._admit()
    for _ in range(5):
        worker._step()
    shutil.rmtree(run / "alice")
    shutil.copytree(root / "spare" / "alice_v2", run / "alice")
    assert adapters.replace("alice", pinned=worker.pinned()) == "alice@2"
    second = worker.submit(Job(prompt, "alice", params, events.append))
    worker._admit()
    assert second.request.adapter == "alice@2" and first.request.adapter == "alice"
    while worker._active:
        worker._step()
        worker._drop_cancelled()
    assert first.request.output_ids == old_ids and second.request.output_ids == new_ids
    assert "alice" not in session.adapters and "alice@2" in session.adapters  # the old weights were freed


def test_a_client_that_goes_away_frees_its_row(live):
    prompt = live.session.tokenizer(PROMPT)["input_ids"]
    from loraforge.infer import generate_many
    offline = live.worker.call(lambda: generate_many(  # on the engine thread, which owns the model
        live.session, [prompt], SamplingParams(max_new_tokens=60), live.store.ensure(["alice"]))[0]).result()
    assert len(offline) == 60  # no stop token: only the disconnect can end the request early
    jobs, submit = [], live.worker.submit
    live.worker.submit = lambda job: jobs.append(job) or submit(job)
    hold = threading.Event()
    try:
        body = {"model": "alice", "prompt": PROMPT, "max_tokens": 60, "stream": True, "temperature": 0}
        with httpx.stream("POST", live.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))  # decoding has begun
            live.worker.call(hold.wait)  # the engine pauses between two steps, mid-request
        deadline = time.time() + 10
        while not jobs[0].cancelled and time.time() < deadline:
            time.sleep(0.01)
        assert jobs[0].cancelled  # noticed while the engine was paused, so no step ran after the client left
    finally:
        live.worker.submit = submit
        hold.set()
    while live.worker.stats()["active_requests"] and time.time() < deadline:
        time.sleep(0.01)
    assert live.worker.stats()["active_requests"] == 0
    assert jobs[0].request.finish_reason == "cancelled" and len(jobs[0].request.output_ids) < 60


def test_sigterm_finishes_requests_in_flight_and_exits_0(world):
    model_dir, store, _ = world
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "serve", "--model", str(model_dir),
                             "--adapters", str(store), "--port", "0"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORAFORGE_API_KEY": KEY})
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before it was serving"
        url = line.split(" on ")[1].split()[0].removesuffix("/v1")
        body = {"model": "bob", "prompt": PROMPT, "max_tokens": 60, "stream": True, "temperature": 0,
                "stop": ["never"]}
        frames = []
        with httpx.stream("POST", url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
            lines = response.iter_lines()
            frames.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            frames += list(lines)
        assert proc.wait(timeout=30) == 0
        data = [f for f in frames if f.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert json.loads(data[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
    finally:
        proc.kill()
        proc.wait()


def test_serving_beyond_loopback_needs_a_key(capsys, monkeypatch):
    monkeypatch.delenv("LORAFORGE_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--api-key" in capsys.readouterr().err
