"""homefire's own clients against the trainer server: ``ServiceClient(base_url=...)`` and
``from_config(trainer_job_id=...)`` from another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import tinker

from training.sdk import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient
from training.sdk.remote import RemoteServiceClient, is_trainer_server_url
from training.sdk.training_client import TrainingUsageError

from .conftest import TEST_MODEL, TrainerServerThread

TEXTS = ["the quick brown fox jumps over the lazy dog", "two plus two is four, not five"]


@pytest.fixture
def server(store_root, tiny_model_dir, monkeypatch) -> Iterator[TrainerServerThread]:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    running = TrainerServerThread(store_root)
    try:
        yield running
    finally:
        running.stop()


def _datums(tokenizer) -> list[Datum]:
    """homefire's own Datum type (plain lists), as a recipe builds them."""
    out = []
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        out.append(Datum(model_input=ModelInput.from_ints(ids[:-1]),
                         loss_fn_inputs={"target_tokens": ids[1:]}))
    return out


def test_base_url_picks_the_server_and_the_hosted_control_plane_stays_local():
    assert is_trainer_server_url("http://127.0.0.1:8000")
    assert not is_trainer_server_url("https://api.fireworks.ai/")
    assert not is_trainer_server_url(None)
    with pytest.raises(TypeError, match="drop 'some/store'"):
        ServiceClient("some/store", base_url="http://127.0.0.1:9")


def test_service_client_by_url_trains_like_the_in_process_client(server, store_root):
    remote_service = ServiceClient(base_url=server.url)
    assert isinstance(remote_service, RemoteServiceClient)
    local_service = ServiceClient(store_root, device="cpu", mixed_precision="no")
    remote = remote_service.create_training_client(TEST_MODEL, lora_rank=0)
    local = local_service.create_training_client(TEST_MODEL, lora_rank=0)
    assert remote.job_id != local.job_id and remote_service.trainer_job_id == remote.job_id
    datums = _datums(remote.get_tokenizer())
    for _ in range(2):  # full-parameter training, bitwise the same as in process
        over_wire = remote.forward_backward(datums).result()
        in_process = local.forward_backward(datums).result()
        assert over_wire.metrics["loss:sum"] == in_process.metrics["loss:sum"]
        remote.optim_step(AdamParams(learning_rate=1e-3)).result()
        local.optim_step(AdamParams(learning_rate=1e-3)).result()
    saved = remote.save_state("step-2").result()
    assert saved.path == f"tinker://{remote.job_id}/weights/step-2"
    with pytest.raises(ValueError, match="already has a training client"):
        remote_service.create_training_client(TEST_MODEL, lora_rank=0)
    # A frozen reference on the server: the base model's logprobs, and no training.
    reference = remote_service.create_reference_client(TEST_MODEL)
    base = local_service.create_reference_client(TEST_MODEL)
    assert (reference.forward(datums).result().metrics["loss:sum"]
            == pytest.approx(base.forward(datums).result().metrics["loss:sum"], rel=1e-6))
    with pytest.raises(TrainingUsageError, match="frozen reference"):
        reference.forward_backward(datums)
    # Sampling with homefire's ModelInput and SamplingParams.
    sampler = remote.save_weights_and_get_sampling_client("sample-2")
    prompt = ModelInput.from_ints(datums[0].model_input.to_ints()[:4])
    out = sampler.sample(prompt, 2, SamplingParams(max_tokens=3, seed=1)).result()
    assert len(out.sequences) == 2 and all(len(s.tokens) <= 3 for s in out.sequences)
    remote_service.close()


_REATTACH = textwrap.dedent("""
    import json, sys
    from training.sdk import AdamParams, Datum, ModelInput, ServiceClient
    url, job_id, data = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    service = ServiceClient.from_config("{model}", lora_rank=4, base_url=url,
                                        trainer_job_id=job_id)
    client = service.create_training_client("{model}", lora_rank=4)
    datums = [Datum(model_input=ModelInput.from_ints(d[0]),
                    loss_fn_inputs={{"target_tokens": d[1]}}) for d in data]
    before = client.forward(datums).result().metrics["loss:sum"]
    client.forward_backward(datums).result()
    client.optim_step(AdamParams(learning_rate=1e-2)).result()
    after = client.forward(datums).result().metrics["loss:sum"]
    print(json.dumps({{"job_id": client.job_id, "attached": client.attached,
                      "step": client.step_at_attach, "before": before, "after": after}}))
""").format(model=TEST_MODEL)


def _reattach_from_another_process(url: str, job_id: str, datums: list[Datum]) -> dict:
    data = json.dumps([[d.model_input.to_ints(), d.loss_fn_inputs["target_tokens"].data]
                       for d in datums])
    done = subprocess.run([sys.executable, "-c", _REATTACH, url, job_id, data],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TINKER_TELEMETRY": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_from_config_trainer_job_id_reattaches_from_another_process(server, store_root):
    service = ServiceClient.from_config(TEST_MODEL, lora_rank=4, base_url=server.url)
    client = service.create_training_client(TEST_MODEL, lora_rank=4)
    datums = _datums(client.get_tokenizer())
    for _ in range(2):
        client.forward_backward(datums).result()
        client.optim_step(AdamParams(learning_rate=1e-2)).result()
    client.save_state("step-2").result()
    live_loss = client.forward(datums).result().metrics["loss:sum"]

    # Another process reattaches the running trainer: same live weights and optimizer, and
    # its step lands on the trainer this process holds.
    seen = _reattach_from_another_process(server.url, client.job_id, datums)
    assert seen["job_id"] == client.job_id and seen["attached"] and seen["step"] == 2
    assert seen["before"] == live_loss
    assert client.forward(datums).result().metrics["loss:sum"] == seen["after"]

    # The wrong shape for the job is refused with the reason, and the client stays usable.
    with pytest.raises(tinker.BadRequestError, match="cannot reattach"):
        ServiceClient.from_config(TEST_MODEL, lora_rank=8, base_url=server.url,
                                  trainer_job_id=client.job_id).create_training_client(
            TEST_MODEL, lora_rank=8)
    assert client.forward(datums).result().metrics["loss:sum"] == seen["after"]
    service.close()


def test_reattach_after_a_server_restart_restores_from_the_last_save(store_root, tiny_model_dir,
                                                                      monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    first = TrainerServerThread(store_root)
    try:
        client = ServiceClient(base_url=first.url).create_training_client(TEST_MODEL, 4)
        datums = _datums(client.get_tokenizer())
        client.forward_backward(datums).result()
        client.optim_step(AdamParams(learning_rate=1e-2)).result()
        saved = client.save_state("step-1").result()
        job_id = client.job_id
        expected = client.forward(datums).result().metrics["loss:sum"]
    finally:
        first.stop()
    second = TrainerServerThread(store_root)
    try:
        service = ServiceClient.from_config(TEST_MODEL, lora_rank=4, base_url=second.url,
                                            trainer_job_id=job_id)
        again = service.create_training_client(TEST_MODEL, lora_rank=4)
        assert again.job_id == job_id and not again.attached and again.step_at_attach == 0
        again.load_state_with_optimizer(saved.path).result()
        assert again.forward(datums).result().metrics["loss:sum"] == expected
        # Saves keep landing in the same job.
        assert again.save_state("step-1b").result().path.startswith(f"tinker://{job_id}/")
        service.close()
    finally:
        second.stop()
