"""The trainer server driven by the official ``tinker`` client (0.38) over loopback HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tinker
import torch

from training.sdk import ServiceClient
from training.server.futures import FutureStore

from .conftest import TEST_MODEL, TrainerServerThread

API_KEY = "tml-test-key"


@pytest.fixture
def server(store_root, tiny_model_dir, monkeypatch) -> Iterator[TrainerServerThread]:
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    running = TrainerServerThread(store_root)
    try:
        yield running
    finally:
        running.stop()


def _datum(tokenizer, text: str) -> tinker.Datum:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tinker.Datum(model_input=tinker.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:],
                                        "weights": [1.0] * (len(ids) - 1)})


TEXTS = ["the quick brown fox jumps over the lazy dog", "two plus two is four, not five"]


def test_tinker_client_trains_like_the_in_process_client_and_resumes(server, store_root):
    service = tinker.ServiceClient(base_url=server.url)
    remote = service.create_lora_training_client(TEST_MODEL, rank=4, seed=3,
                                                 user_metadata={"run": "wire"}).result()
    local = ServiceClient(store_root, device="cpu", mixed_precision="no") \
        .create_lora_training_client(TEST_MODEL, rank=4, seed=3)
    tokenizer = remote.get_tokenizer()
    datums = [_datum(tokenizer, t) for t in TEXTS]
    for _ in range(3):
        over_wire = remote.forward_backward(datums, "cross_entropy").result()
        in_process = local.forward_backward(datums, "cross_entropy").result()
        assert over_wire.metrics["loss:sum"] == pytest.approx(in_process.metrics["loss:sum"],
                                                              rel=1e-6)
        for a, b in zip(over_wire.loss_fn_outputs, in_process.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(),
                                       rtol=1e-6, atol=1e-6)
        optim = remote.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
        local.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    assert optim.metrics["step"] == 3
    saved = remote.save_state("step-3", user_metadata={"stage": "sft"}).result()
    assert saved.path.startswith("tinker://") and saved.path.endswith("/weights/step-3")
    # A new client resumes from the saved state, weights and optimizer, as Tinker's does.
    resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
    for client in (remote, resumed):
        client.forward_backward(datums, "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    a = remote.forward(datums, "cross_entropy").result().metrics["loss:sum"]
    b = resumed.forward(datums, "cross_entropy").result().metrics["loss:sum"]
    assert a == b  # bitwise: same weights, same optimizer moments
    weights_only = service.create_training_client_from_state(saved.path).result()
    assert weights_only.get_info().lora_rank == 4
    # The run, its metadata and its checkpoints through the REST client.
    rest = tinker.RestClient(base_url=server.url)
    run = rest.get_training_run_by_tinker_path(saved.path).result()
    assert run.user_metadata == {"run": "wire"} and run.is_lora and run.lora_rank == 4
    listed = rest.list_checkpoints(run.training_run_id).result().checkpoints
    assert [c.checkpoint_type for c in listed] == ["training"]
    assert listed[0].user_metadata == {"stage": "sft"}
    rest.delete_checkpoint(run.training_run_id, "weights/step-3").result()
    assert rest.list_checkpoints(run.training_run_id).result().checkpoints == []
    assert TEST_MODEL in [m.model_name for m in
                          service.get_server_capabilities().supported_models]


def test_sampling_logprobs_and_rl_losses_over_the_wire(server):
    service = tinker.ServiceClient(base_url=server.url)
    client = service.create_lora_training_client(TEST_MODEL, rank=4, seed=0).result()
    tokenizer = client.get_tokenizer()
    ids = tokenizer.encode(TEXTS[0], add_special_tokens=False)
    sampler = client.save_weights_and_get_sampling_client().result()
    prompt = tinker.ModelInput.from_ints(ids[:5])
    out = sampler.sample(prompt, num_samples=3, sampling_params=tinker.SamplingParams(
        max_tokens=6, seed=7), include_prompt_logprobs=True, topk_prompt_logprobs=2).result()
    assert len(out.sequences) == 3 and all(s.sequence_id for s in out.sequences)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == 5
    assert out.topk_prompt_logprobs[0] is None and len(out.topk_prompt_logprobs[1]) == 2
    logprobs = sampler.compute_logprobs(tinker.ModelInput.from_ints(ids)).result()
    forward = client.forward([tinker.Datum(model_input=tinker.ModelInput.from_ints(ids[:-1]),
                                           loss_fn_inputs={"target_tokens": ids[1:]})],
                             "cross_entropy").result()
    np.testing.assert_allclose(logprobs[1:], forward.loss_fn_outputs[0]["logprobs"].tolist(),
                               atol=1e-4)
    # RL: the sampled tokens with their logprobs and an advantage, under Tinker's losses.
    seq = out.sequences[0]
    full = [*ids[:5], *seq.tokens]
    rl = tinker.Datum(model_input=tinker.ModelInput.from_ints(full[:-1]), loss_fn_inputs={
        "target_tokens": full[1:], "logprobs": [0.0] * 4 + list(seq.logprobs),
        "advantages": [0.0] * 4 + [1.0] * len(seq.tokens)})
    for loss_fn, config in [("importance_sampling", None),
                            ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
                            ("cispo", None), ("dro", {"beta": 0.1})]:
        result = client.forward_backward([rl], loss_fn, loss_fn_config=config).result()
        assert np.isfinite(result.metrics["loss:sum"])
    client.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
    # The client's two-pass custom loss (forward, then a weighted backward).
    custom = client.forward_backward_custom(
        [_datum(tokenizer, TEXTS[1])],
        lambda data, lps: (-(lps[0] ** 2).sum(), {"sq": float((lps[0] ** 2).sum().detach())})
    ).result()
    assert custom.metrics["sq"] > 0
    # A named sampler checkpoint samples through create_sampling_client(model_path=...).
    named = client.save_weights_for_sampler("named").result()
    again = service.create_sampling_client(model_path=named.path)
    assert again.get_base_model() == TEST_MODEL
    assert len(again.sample(prompt, 1, tinker.SamplingParams(max_tokens=2)).result()
               .sequences[0].tokens) <= 2


def test_errors_come_back_as_tinker_errors_and_the_client_stays_usable(server):
    service = tinker.ServiceClient(base_url=server.url)
    client = service.create_lora_training_client(TEST_MODEL, rank=2).result()
    datum = _datum(client.get_tokenizer(), TEXTS[0])
    with pytest.raises(tinker.RequestFailedError, match="unknown loss 'mse'"):
        client.forward_backward([datum], "mse").result()
    with pytest.raises(tinker.RequestFailedError, match="optim_step called with no gradients") \
            as refused:
        client.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
    assert str(refused.value.category).lower().endswith("user")  # the caller's error
    bad = tinker.Datum(model_input=datum.model_input, loss_fn_inputs={
        **datum.loss_fn_inputs, "wieghts": datum.loss_fn_inputs["weights"]})
    with pytest.raises(tinker.RequestFailedError, match="wieghts"):
        client.forward_backward([bad], "cross_entropy").result()
    assert client.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
    with pytest.raises(Exception, match="is not served here"):
        service.create_lora_training_client("homefire/tiny-qwen3-10m", rank=2).result()


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_4xx_with_a_message(server, monkeypatch):
    import training.server.app as app_module

    api = f"{server.url}/api/v1"
    limit = app_module.MAX_BODY_BYTES
    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    status, body = _post(f"{api}/create_session", b"{" + b" " * 2000 + b"}")
    assert status == 413 and "over 1000 bytes" in body["error"]
    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", limit)
    status, body = _post(f"{api}/create_session", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]
    status, body = _post(f"{api}/create_session", b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = _post(f"{api}/forward_backward", b"\x08\x01\x12garbage",
                         {"Content-Type": "application/x-protobuf"})
    assert status == 400 and "ForwardBackwardRequest" in body["error"]
    status, body = _post(f"{api}/optim_step", json.dumps({"model_id": "nope"}).encode())
    assert status == 404 and "not loaded" in body["error"]
    status, body = _post(f"{api}/retrieve_future", json.dumps({"request_id": "x"}).encode())
    assert status == 404 and "unknown request_id" in body["error"]
    session = _post(f"{api}/create_session", b"{}")[1]["session_id"]
    for path in ("tinker://../weights/x", "tinker://job/weights/../../etc",
                 "/etc/passwd", "tinker://job/sampler_weights/a/b"):
        status, body = _post(f"{api}/load_weights", json.dumps(
            {"session_id": session, "model_seq_id": 0, "path": path}).encode())
        assert status == 400, (path, body)
    status, body = _post(f"{api}/create_sampling_session", json.dumps(
        {"session_id": session, "model_path": "tinker://../sampler_weights/x"}).encode())
    assert status == 400


def test_api_key_is_required_when_set(store_root, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    secured = TrainerServerThread(store_root, api_key="tml-secret")
    try:
        api = f"{secured.url}/api/v1"
        status, body = _post(f"{api}/create_session", b"{}")
        assert status == 401 and "X-API-Key" in body["error"]
        status, _ = _post(f"{api}/create_session", b"{}", {"X-API-Key": "tml-wrong"})
        assert status == 401
        status, body = _post(f"{api}/create_session", b"{}", {"X-API-Key": "tml-secret"})
        assert status == 200 and body["session_id"]
        with urllib.request.urlopen(f"{api}/healthz", timeout=10) as response:
            assert json.loads(response.read()) == {"status": "ok"}
        monkeypatch.setenv("TINKER_API_KEY", "tml-secret")
        client = tinker.ServiceClient(base_url=secured.url).create_lora_training_client(
            TEST_MODEL, rank=2).result()
        assert client.get_info().model_data.model_name == TEST_MODEL
    finally:
        secured.stop()


def test_futures_survive_a_restart_and_duplicates_do_not_run_twice(tmp_path):
    path = str(tmp_path / "futures.sqlite")
    store = FutureStore(path)
    done, created = store.create("optim_step", "m:train:0", 1)
    assert created
    assert store.create("optim_step", "m:train:0", 1) == (done, False)  # a duplicate POST
    store.finish(done, {"metrics": {"step": 1.0}})
    pending, _ = store.create("forward_backward", "m:train:0", 2)
    store.close()
    reopened = FutureStore(path)  # the process died and restarted
    assert reopened.get(done).json() == {"metrics": {"step": 1.0}}
    record = reopened.get(pending)
    assert record.status == "failed" and "restarted" in record.json()["error"]
    assert reopened.last_seq("m:train:0") == 2
    reopened.close()


def test_one_models_requests_run_in_seq_id_order_even_when_they_arrive_out_of_order():
    from training.server.scheduler import Scheduler

    scheduler = Scheduler(grace_s=5.0)
    ran: list[tuple[str, int]] = []
    done = threading.Event()
    scheduler.expect("a", 0)
    scheduler.expect("b", 0)
    for seq in (3, 2):  # chunks 2..N posted before chunk 1
        scheduler.submit("a", seq, lambda seq=seq: ran.append(("a", seq)))
    scheduler.submit("b", 1, lambda: ran.append(("b", 1)))
    time.sleep(0.2)
    assert ran == [("b", 1)]  # "a" waits for its seq 1; "b" is not held behind it
    scheduler.submit("a", 1, lambda: ran.append(("a", 1)))
    scheduler.submit("a", 4, done.set)
    assert done.wait(5)
    assert [r for r in ran if r[0] == "a"] == [("a", 1), ("a", 2), ("a", 3)]
    scheduler.close()
    torch.manual_seed(0)  # keep the global RNG state tidy for later tests


def _start_server_process(store_root: str, port: int):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, str(repo / "scripts" / "trainer_server.py"), "--base-model", TEST_MODEL,
         "--storage-root", store_root, "--port", str(port), "--device", "cpu",
         "--mixed-precision", "no", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/healthz",
                                        timeout=2) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not answer /healthz within 60 s")


def test_kill_9_the_server_then_resume_from_the_last_save_is_bitwise(store_root, tiny_model_dir,
                                                                      monkeypatch):
    import signal

    from .conftest import free_port

    monkeypatch.setenv("TINKER_API_KEY", API_KEY)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def train(client, datums, steps):
        for _ in range(steps):
            client.forward_backward(datums, "cross_entropy").result()
            client.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()

    def adapter(client, name):
        path = client.save_weights_for_sampler(name).result().path
        run, _, snapshot = path.removeprefix("tinker://").split("/")
        from safetensors.torch import load_file
        return load_file(f"{store_root}/jobs/{run}/samplers/{snapshot}/"
                         f"adapter_model.safetensors")

    server = _start_server_process(store_root, port)
    try:
        client = tinker.ServiceClient(base_url=url).create_lora_training_client(
            TEST_MODEL, rank=4, seed=11).result()
        datums = [_datum(client.get_tokenizer(), t) for t in TEXTS]
        train(client, datums, 2)
        saved = client.save_state("step-2").result()
        train(client, datums, 1)  # progress after the last save, lost with the server
        client.forward_backward(datums, "cross_entropy")  # in flight when the server dies
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    server = _start_server_process(store_root, port)
    try:
        service = tinker.ServiceClient(base_url=url)
        resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
        train(resumed, datums, 2)
        uninterrupted = service.create_lora_training_client(TEST_MODEL, rank=4, seed=11).result()
        train(uninterrupted, datums, 4)
        a, b = adapter(resumed, "resumed"), adapter(uninterrupted, "reference")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)


def test_tenants_with_different_keys_cannot_reach_each_others_runs(store_root, tiny_model_dir,
                                                                   monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    server = TrainerServerThread(store_root, api_key=["tml-alice", "tml-bob"])
    try:
        alice = tinker.ServiceClient(base_url=server.url, api_key="tml-alice")
        bob = tinker.ServiceClient(base_url=server.url, api_key="tml-bob")
        client = alice.create_lora_training_client(TEST_MODEL, rank=2).result()
        datum = _datum(client.get_tokenizer(), TEXTS[0])
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()
        state = client.save_state("mine").result().path
        sampler = client.save_weights_for_sampler("mine").result().path
        run_id = state.split("/")[2]
        assert tinker.RestClient(base_url=server.url, api_key="tml-alice") \
            .get_training_run(run_id).result().training_run_id == run_id
        # Bob sees none of it: the run, its checkpoints, its model id, its sampler.
        rest = tinker.RestClient(base_url=server.url, api_key="tml-bob")
        assert run_id not in [r.training_run_id for r in
                              rest.list_training_runs().result().training_runs]
        api = f"{server.url}/api/v1"
        for url in (f"{api}/training_runs/{run_id}", f"{api}/training_runs/{run_id}/checkpoints"):
            request = urllib.request.Request(url, headers={"X-API-Key": "tml-bob"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 404
        session = _post(f"{api}/create_session", b"{}", {"X-API-Key": "tml-bob"})[1]
        for path, body in [
            ("load_weights", {"session_id": session["session_id"], "model_seq_id": 0,
                              "path": state}),
            ("create_sampling_session", {"session_id": session["session_id"],
                                         "sampling_session_seq_id": 0, "model_path": sampler}),
            ("optim_step", {"model_id": client.model_id, "seq_id": 99,
                            "adam_params": {"learning_rate": 1e-3}}),
        ]:
            status, reply = _post(f"{api}/{path}", json.dumps(body).encode(),
                                  {"X-API-Key": "tml-bob"})
            assert status == 404, (path, reply)
        with pytest.raises(Exception):  # noqa: B017 (tinker wraps the 404 its own way)
            bob.create_training_client_from_state(state).result()
        # Alice still resumes her own state.
        assert alice.create_training_client_from_state(state).result().get_info().lora_rank == 2
    finally:
        server.stop()
