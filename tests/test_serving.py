"""The OpenAI-compatible server, driven by the official ``openai`` client on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from training.sdk import (
    AdamParams,
    Datum,
    DeploymentManager,
    ModelInput,
    SamplingParams,
    ServiceClient,
)
from training.sdk.serving import OpenAIServer

from .conftest import TEST_MODEL

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def served(store_root, tiny_model_dir):
    service = ServiceClient(store_root, mixed_precision="no", device="cpu",
                            sampler_dtype="bfloat16")
    client = service.create_training_client(TEST_MODEL)
    manager = DeploymentManager(service.store, device="cpu", engine="transformers")
    manager.create_deployment(TEST_MODEL, "http")
    server = OpenAIServer(manager, "http", port=0, default_job_id=client.job_id).start()
    api = openai.OpenAI(base_url=server.url, api_key="unused", timeout=30, max_retries=0)
    try:
        yield client, manager, server, api
    finally:
        server.shutdown()


def test_openai_client_chat_hotload_changes_the_answer(served) -> None:
    client, manager, server, api = served
    assert [m.id for m in api.models.list().data] == [TEST_MODEL]
    before = api.chat.completions.create(model=TEST_MODEL, messages=MESSAGES, max_tokens=8,
                                         temperature=0, logprobs=True)
    choice = before.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert before.usage.completion_tokens == len(choice.logprobs.content) > 0

    # Train the policy until its greedy answer differs, then hotload between two requests.
    tokens = list(range(3, 40))
    datum = Datum(model_input=ModelInput.from_ints(tokens[:-1]),
                  loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:])})
    for _ in range(3):
        client.forward_backward([datum]).result()
        client.optim_step(AdamParams(learning_rate=3e-2)).result()
    base = client.save_weights_for_sampler_ext("step-3")
    status, reply = _post(f"{server.url}/hotload", {"snapshot": base.snapshot_name})
    assert status == 200 and reply["current_snapshot_identity"] == base.path
    after = api.chat.completions.create(model=TEST_MODEL, messages=MESSAGES, max_tokens=8,
                                        temperature=0)
    assert after.choices[0].message.content != choice.message.content

    # What the server answers is what the deployment samples with the hot-loaded weights.
    prompt = manager.get("http").tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokenizer = manager.get("http").tokenizer
    direct = manager.get("http").sample([prompt], SamplingParams(max_tokens=8,
                                                                  temperature=0))[0][0]
    assert after.choices[0].message.content == tokenizer.decode(direct.tokens,
                                                                skip_special_tokens=True)

    # Streaming gives the same text as the non-streamed request.
    stream = api.chat.completions.create(model=TEST_MODEL, messages=MESSAGES, max_tokens=8,
                                         temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        after.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == after.choices[0].finish_reason


def test_openai_client_completions_and_errors(served) -> None:
    client, _, server, api = served
    completion = api.completions.create(model=TEST_MODEL, prompt="The capital of France is",
                                        max_tokens=6, temperature=0, logprobs=1, n=1)
    choice = completion.choices[0]
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == \
        completion.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model=TEST_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
        stream=True))
    assert streamed == choice.text
    several = api.completions.create(model=TEST_MODEL, prompt="Hello", max_tokens=4, n=3,
                                     seed=5)
    assert [c.index for c in several.choices] == [0, 1, 2]

    with pytest.raises(openai.NotFoundError, match="is not served here"):
        api.chat.completions.create(model="other-model", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        api.chat.completions.create(model=TEST_MODEL, messages=MESSAGES, temperature=-1)
    status, reply = _post(f"{server.url}/hotload", {"snapshot": "nope-00000000"})
    assert status == 404 and "has no sampler snapshot 'nope-00000000'" in \
        reply["error"]["message"]
    client.save_weights_for_sampler_ext("b")
    delta = client.save_weights_for_sampler_ext("d")
    # sync loads the chain, so a delta on a fresh deployment works over HTTP too.
    status, reply = _post(f"{server.url}/hotload", {"snapshot": delta.path})
    assert status == 200 and len(reply["loaded"]) == 2


def test_fifty_concurrent_requests_are_all_answered(served) -> None:
    import concurrent.futures

    _, _, server, _ = served

    def ask(i: int) -> tuple[int, dict]:
        return _post(f"{server.url}/chat/completions", {
            "model": TEST_MODEL, "max_tokens": 3, "seed": i,
            "messages": [{"role": "user", "content": f"count to {i}"}]})

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(pool.map(ask, range(50)))
    assert [status for status, _ in replies] == [200] * 50
    assert all(reply["choices"][0]["finish_reason"] in ("stop", "length") for _, reply in replies)


@pytest.mark.parametrize(("payload", "match"), [
    ([1, 2], "must be a JSON object"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]\.role is 'robot'"),
    ({"messages": MESSAGES, "stop": 7}, "'stop' must be a string or a list of strings"),
    ({"messages": MESSAGES, "max_tokens": 0}, "'max_tokens' must be an integer >= 1"),
    ({"messages": MESSAGES, "max_tokens": -5}, "'max_tokens' must be an integer >= 1"),
    ({"messages": MESSAGES, "n": 0}, "'n' must be an integer between 1 and 64"),
    ({"messages": MESSAGES, "n": 1000}, "'n' must be an integer between 1 and 64"),
    ({"messages": MESSAGES, "seed": "x"}, "'seed' must be an integer"),
])
def test_bad_requests_are_refused_with_400(served, payload, match) -> None:
    import re

    _, _, server, _ = served
    request = urllib.request.Request(f"{server.url}/chat/completions",
                                     data=json.dumps(payload).encode(), method="POST")
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400
        assert re.search(match, json.loads(e.read())["error"]["message"])


def test_a_prompt_longer_than_the_context_is_refused_at_once(served) -> None:
    import time

    _, _, server, _ = served
    started = time.perf_counter()
    status, reply = _post(f"{server.url}/completions",
                          {"model": TEST_MODEL, "prompt": "word " * 99_000, "max_tokens": 2})
    assert status == 400 and "context" in reply["error"]["message"]
    status, reply = _post(f"{server.url}/completions",
                          {"model": TEST_MODEL, "prompt": list(range(5, 3000)), "max_tokens": 2})
    assert status == 400 and "has 2995 tokens; the model's context is 2048" in \
        reply["error"]["message"]
    assert time.perf_counter() - started < 5
