"""Embeddings: forward_backward_custom(output="embedding") and the embedding_loop recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.recipes.embedding_loop import Config, main
from training.sdk import AdamParams, Datum, ModelInput
from training.utils import ConfigError, InfraConfig
from training.utils.data import DatasetError
from training.utils.embedding_data import SAMPLE_PAIRS_PATH, info_nce, pair_datums
from training.utils.metrics import read_metrics

from .conftest import TEST_MODEL, checkpoint_rows, final_sampler_weights


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_are_the_pooled_final_hidden_states_of_each_text(make_client, pooling):
    client = make_client()
    tokenizer = client.get_tokenizer()
    texts = ["the quick brown fox", "jumps over the lazy dog, twice and then once more", "hi"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    received = []

    def loss_fn(datums, embeddings):
        received.extend(e.detach().clone() for e in embeddings)
        return torch.stack(embeddings).pow(2).sum(), {"n": float(len(embeddings))}

    out = client.forward_backward_custom([Datum(model_input=ModelInput.from_ints(i)) for i in ids],
                                         loss_fn, output="embedding", pooling=pooling).result()
    assert out.metrics == {"n": 3.0}
    with torch.no_grad():  # each text alone, no packing
        for tokens, got, output in zip(ids, received, out.loss_fn_outputs, strict=True):
            hidden = client.model(input_ids=torch.tensor([tokens]), output_hidden_states=True,
                                  use_cache=False).hidden_states[-1][0]
            expected = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
            assert got.shape == (client.model.config.hidden_size,)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(output["embedding"].to_torch(), got)
    before = [p.detach().clone() for p in client.model.parameters()]
    client.optim_step(AdamParams(learning_rate=1e-2)).result()
    assert any(not torch.equal(a, b) for a, b in zip(before, client.model.parameters(),
                                                     strict=True))


def test_embedding_output_and_pooling_values_are_checked(make_client):
    client = make_client()
    datum = Datum(model_input=ModelInput.from_ints([5, 6, 7]))
    with pytest.raises(ValueError, match="output='embeddings'"):
        client.forward_backward_custom([datum], lambda d, e: (e[0].sum(), {}),
                                       output="embeddings")
    with pytest.raises(ValueError, match="pooling='max'"):
        client.forward_backward_custom([datum], lambda d, e: (e[0].sum(), {}),
                                       output="embedding", pooling="max")
    with pytest.raises(ValueError, match="does not depend on the embedding"):
        client.forward_backward_custom([datum], lambda d, e: (torch.tensor(1.0), {}),
                                       output="embedding")


def test_info_nce_prefers_matching_pairs():
    torch.manual_seed(0)
    queries = torch.randn(4, 8)
    matched = list(queries) + list(queries + 0.01 * torch.randn(4, 8))
    shuffled = list(queries) + list(queries[[1, 2, 3, 0]])
    good, good_metrics = info_nce(matched, 4, temperature=0.1)
    bad, bad_metrics = info_nce(shuffled, 4, temperature=0.1)
    assert good < bad and good_metrics["accuracy"] == 1.0 and bad_metrics["accuracy"] == 0.0
    assert good_metrics["positive_similarity"] > 0.99 > good_metrics["negative_similarity"]


def _pairs(tmp_path: Path, n: int = 24, negatives: bool = False) -> str:
    lines = SAMPLE_PAIRS_PATH.read_text().splitlines()[:n]
    rows = [json.loads(line) for line in lines]
    if negatives:
        for i, row in enumerate(rows):
            row["negative"] = rows[(i + 1) % len(rows)]["positive"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path: Path, log_name: str = "run", **overrides) -> Config:
    fields = dict(log_path=str(tmp_path / log_name), base_model=TEST_MODEL,
                  dataset=_pairs(tmp_path), batch_size=4, epochs=2, learning_rate=1e-3, seed=3,
                  infra=InfraConfig(storage_root=str(tmp_path / "store"), num_threads=1,
                                    mixed_precision="no"))
    fields.update(overrides)
    return Config(**fields)


def test_recipe_resumes_bitwise_and_promotes(tmp_path):
    reference = main(_config(tmp_path, "reference", dcp_save_interval=5))
    interrupted = _config(tmp_path, "interrupted", dcp_save_interval=5)
    main(interrupted)
    log = Path(interrupted.log_path)
    rows = checkpoint_rows(log)
    assert [r["step"] for r in rows] == [5, 10, 12]
    (log / "checkpoints.jsonl").write_text(json.dumps(rows[0]) + "\n")
    resumed = main(interrupted)
    ref_w = final_sampler_weights(tmp_path, reference.log_path)
    got_w = final_sampler_weights(tmp_path, resumed.log_path)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    metrics = read_metrics(log)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert {"loss", "accuracy", "positive_similarity", "negative_similarity"} <= metrics[0].keys()


def test_hard_negatives_and_pooling_last_train_and_promote(tmp_path):
    from transformers import AutoModelForCausalLM

    result = main(_config(tmp_path, dataset=_pairs(tmp_path, negatives=True), pooling="last",
                          max_steps=3, output_model_id="emb-model"))
    metrics = read_metrics(result.log_path)
    assert len(metrics) == 3 and all(m["loss"] > 0 for m in metrics)
    promoted = AutoModelForCausalLM.from_pretrained(result.promoted_model["path"])
    assert promoted.config.hidden_size == 64


def test_bad_pairs_and_settings_are_refused_before_any_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n"
                   + json.dumps({"query": "q", "postive": "p"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: unknown field\(s\) \['postive'\]"):
        main(_config(tmp_path, dataset=str(bad)))
    bad.write_text(json.dumps({"query": "q", "positive": ""}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: 'positive' must be a non-empty"):
        main(_config(tmp_path, dataset=str(bad)))
    for field, value, match in [("pooling", "max", "pooling='max'"),
                                ("temperature", 0.0, "temperature must be a finite number > 0"),
                                ("batch_size", 1, "batch_size must be >= 2")]:
        with pytest.raises(ConfigError, match=match):
            main(_config(tmp_path, **{field: value}))
    assert not (tmp_path / "store" / "jobs").exists()


def test_command_line_runs_the_recipe(tmp_path):
    log = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.embedding_loop", f"log_path={log}",
         f"base_model={TEST_MODEL}", f"dataset={_pairs(tmp_path)}", "max_steps=2",
         f"infra.storage_root={tmp_path / 'store'}", "infra.num_threads=1"],
        capture_output=True, text=True, timeout=240, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in checkpoint_rows(log)] == [2]


def test_pair_datums_order_queries_positives_negatives(tmp_path):
    from training.utils.embedding_data import PairExample

    batch = [PairExample([1], [2], [3]), PairExample([4], [5], None)]
    assert [d.model_input.to_ints() for d in pair_datums(batch)] == [[1], [4], [2], [5], [3]]
