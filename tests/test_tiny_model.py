"""Tests of the built-in tiny models, their tokenizer and chat template, and the bundled data."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.sdk import tiny_model
from training.sdk.tiny_model import (
    SAMPLE_CHATS_PATH,
    TINY_MODELS,
    TOKENIZER_CORPUS_PATH,
    build_tiny_model,
    build_tiny_tokenizer,
    default_cache_dir,
    ensure_tiny_model,
    is_tiny_model,
    tiny_model_cache_path,
)

TEST_MODEL = "homefire/tiny-qwen3-test"
DEFAULT_MODEL = "homefire/tiny-qwen3"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The two small models, each built once for this module."""
    return {name: build_tiny_model(name, tmp_path_factory.mktemp(name.replace("/", "__")))
            for name in (TEST_MODEL, DEFAULT_MODEL)}


@pytest.fixture(scope="module")
def tokenizer(built_dirs: dict[str, Path]):
    return AutoTokenizer.from_pretrained(built_dirs[TEST_MODEL])


@pytest.fixture(scope="module")
def sample_chats() -> list[dict]:
    with SAMPLE_CHATS_PATH.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def render(tokenizer, messages: list[dict], **kwargs) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TEST_MODEL, DEFAULT_MODEL])
def test_built_model_loads_with_auto_classes_and_generates(built_dirs, name):
    model_dir = built_dirs[name]
    for file in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (model_dir / file).is_file(), file
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert model.config.max_position_embeddings == 2048
    assert all(p.dtype == torch.float32 for p in model.parameters())

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert torch.equal(out[0, : prompt["input_ids"].shape[1]], prompt["input_ids"][0])
    assert int(out.max()) < len(tok)


@pytest.mark.parametrize(("name", "low", "high"), [
    (TEST_MODEL, 0.3e6, 0.6e6),
    (DEFAULT_MODEL, 1e6, 3e6),
    ("homefire/tiny-qwen3-10m", 8e6, 12e6),
])
def test_parameter_count_in_expected_range(built_dirs, tmp_path, name, low, high):
    model_dir = built_dirs[name] if name in built_dirs else build_tiny_model(name, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert low <= model.num_parameters() <= high


def test_tied_embeddings_survive_save_and_reload(built_dirs):
    model_dir = built_dirs[TEST_MODEL]
    # Saved once: the LM head is recorded as tied, not stored as a second copy.
    stored = load_file(model_dir / "model.safetensors")
    assert "model.embed_tokens.weight" in stored
    assert "lm_head.weight" not in stored
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, stored["model.embed_tokens.weight"])


def test_build_is_deterministic_and_independent_of_global_seed(tmp_path):
    torch.manual_seed(123)
    first = build_tiny_model(TEST_MODEL, tmp_path / "a")
    torch.manual_seed(456)
    second = build_tiny_model(TEST_MODEL, tmp_path / "b")
    weights_a = load_file(first / "model.safetensors")
    weights_b = load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for file in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (first / file).read_bytes() == (second / file).read_bytes(), file
    # Not a constant: the weights are actually random draws.
    embed = weights_a["model.embed_tokens.weight"]
    assert 0.015 < float(embed.std()) < 0.025


def test_build_leaves_global_torch_state_alone(tmp_path):
    torch.manual_seed(0)
    rng_before = torch.get_rng_state()
    dtype_before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model_dir = build_tiny_model(TEST_MODEL, tmp_path)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype_before)
    assert torch.equal(torch.get_rng_state(), rng_before)
    # Built in fp32 although the caller's default dtype was fp64.
    stored = load_file(model_dir / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float32}


def test_unknown_name_is_rejected_with_the_known_names(tmp_path):
    assert is_tiny_model(TEST_MODEL)
    assert not is_tiny_model("Qwen/Qwen3-0.6B")
    for call in (lambda: build_tiny_model("homefire/nope", tmp_path),
                 lambda: ensure_tiny_model("homefire/nope", cache_dir=tmp_path)):
        with pytest.raises(ValueError, match="homefire/nope") as info:
            call()
        for known in TINY_MODELS:
            assert known in str(info.value)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "café ✓ 数字",
    "Hello,  world !\n\n\tindented  text ",
    "😀 🚀 “quotes” — Привет, 한국어, Ελληνικά, Zażółć",
    "x = [1, 2, 3]  # comment\r\nend",
    "123456789 + 0.25 = ?",
    "a , b . c ! it 's do n't",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nhm\n</think>",
])
def test_tokenizer_round_trips_text_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length == 2048
    assert 2048 <= len(tokenizer) <= 4096
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>", "<think>", "</think>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)], token
    # Digits split one by one (Qwen's pre-tokenizer), so arithmetic is learnable.
    assert len(tokenizer("2025", add_special_tokens=False)["input_ids"]) == 4
    # Control tokens are dropped by skip_special_tokens, markup tokens are kept.
    ids = tokenizer("<|im_start|>a<think>b</think><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids["input_ids"], skip_special_tokens=True) == "a<think>b</think>"


def test_tokenizer_build_is_deterministic():
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == \
        build_tiny_tokenizer().backend_tokenizer.to_str()


def test_chat_template_renders_chatml_with_tool_calls(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "18"},
        {"role": "tool", "tool_call_id": "c2", "content": "21"},
        {"role": "assistant", "content": "Paris 18, Lima 21.", "reasoning_content": "compare"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Lima?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18\n</tool_response><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n21\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\ncompare\n</think>\n\nParis 18, Lima 21.<|im_end|>\n"
    )
    assert render(tokenizer, messages) == expected
    assert render(tokenizer, messages[:2], add_generation_prompt=True) == (
        expected[: expected.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")])
    with_content = [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}]
    assert render(tokenizer, with_content) == (
        '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "f", "arguments": {}}\n'
        "</tool_call><|im_end|>\n")


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="Unknown message role: robot"):
        render(tokenizer, [{"role": "robot", "content": "beep"}])


def test_chat_template_masks_assistant_tokens(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    out = tokenizer.apply_chat_template(messages, return_dict=True,
                                        return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Hello!<|im_end|>"


def assert_incremental(tokenizer, messages: list[dict], **kwargs) -> None:
    """Rendering messages[:i] is a prefix of messages[:i+1] (and the generation prompt too)."""
    # transformers refuses to render an empty conversation; its rendering is "" by definition.
    for i in range(1, len(messages)):
        shorter = render(tokenizer, messages[:i], **kwargs)
        longer = render(tokenizer, messages[: i + 1], **kwargs)
        assert longer.startswith(shorter) and len(longer) > len(shorter), (i, messages)
        if messages[i]["role"] == "assistant":
            prompt = render(tokenizer, messages[:i], add_generation_prompt=True, **kwargs)
            assert longer.startswith(prompt), (i, messages)


def test_chat_template_is_incremental_on_every_sample_chat(tokenizer, sample_chats):
    for chat in sample_chats:
        assert_incremental(tokenizer, chat["messages"])


def test_chat_template_is_incremental_with_tools_and_thinking(tokenizer, sample_chats):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    tool_chats = [c["messages"] for c in sample_chats
                  if any(m.get("tool_calls") for m in c["messages"])]
    assert tool_chats
    for messages in tool_chats:
        assert_incremental(tokenizer, messages, tools=tools)
        with_system = [{"role": "system", "content": "Use tools."},
                       *(m for m in messages if m["role"] != "system")]
        assert_incremental(tokenizer, with_system, tools=tools)
        assert render(tokenizer, with_system, tools=tools).count("<|im_start|>system") == 1
    # Earlier thinking stays in the history (Qwen3 would strip it, breaking the property).
    thinking = [{"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "<think>\nsum\n</think>\n\n2"},
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "sum again"}]
    assert_incremental(tokenizer, thinking)
    assert "<think>\nsum\n</think>" in render(tokenizer, thinking)


# ---------------------------------------------------------------------------------------------
# Bundled data
# ---------------------------------------------------------------------------------------------


def test_sample_chats_shape_and_lengths(tokenizer, sample_chats):
    assert len(sample_chats) == 400
    roles = {"system", "user", "assistant", "tool"}
    lengths = []
    for chat in sample_chats:
        messages = chat["messages"]
        assert {m["role"] for m in messages} <= roles
        assert messages[-1]["role"] == "assistant"
        lengths.append(len(tokenizer.apply_chat_template(messages, return_dict=False)))
    assert max(lengths) < 256
    assert sum(lengths) / len(lengths) < 100

    def count(predicate) -> int:
        return sum(1 for c in sample_chats if any(predicate(m) for m in c["messages"]))
    assert count(lambda m: m.get("tool_calls")) >= 10
    assert count(lambda m: m["role"] == "tool") >= 10
    assert count(lambda m: m["role"] == "system") >= 50
    assert count(lambda m: m.get("weight") == 0) >= 3
    assert sum(1 for c in sample_chats if len(c["messages"]) >= 4) >= 50


def test_bundled_data_matches_its_generator():
    spec = importlib.util.spec_from_file_location(
        "make_sample_data", REPO_ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SAMPLE_CHATS_FILE.resolve() == SAMPLE_CHATS_PATH.resolve()
    assert module.TOKENIZER_CORPUS_FILE.resolve() == TOKENIZER_CORPUS_PATH.resolve()
    assert module.main(["--check"]) == 0, "run python scripts/make_sample_data.py"
    total = SAMPLE_CHATS_PATH.stat().st_size + TOKENIZER_CORPUS_PATH.stat().st_size
    assert total < 1_000_000


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOMEFIRE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert tiny_model_cache_path(TEST_MODEL).parent == \
        tmp_path / "models" / "homefire__tiny-qwen3-test"
    monkeypatch.delenv("HOMEFIRE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "homefire"


def test_ensure_builds_once_then_reuses(tmp_path, monkeypatch):
    calls = []
    real_build = tiny_model.build_tiny_model
    monkeypatch.setattr(tiny_model, "build_tiny_model",
                        lambda name, out: calls.append(name) or real_build(name, out))
    first = ensure_tiny_model(TEST_MODEL, cache_dir=tmp_path)
    assert first == tiny_model_cache_path(TEST_MODEL, tmp_path)
    assert first.parent == tmp_path / "models" / "homefire__tiny-qwen3-test"
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_tiny_model(TEST_MODEL, cache_dir=tmp_path)
    assert second == first
    assert calls == [TEST_MODEL]
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    AutoModelForCausalLM.from_pretrained(first)
    # Nothing left but the entry and its lock file.
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(
        [first.name, f".{first.name}.lock"])


def test_ensure_is_safe_when_called_concurrently(tmp_path, monkeypatch):
    calls = []
    real_build = tiny_model.build_tiny_model

    def slow_build(name, out):
        calls.append(name)
        time.sleep(0.3)  # hold the lock long enough that every thread is waiting on it
        return real_build(name, out)

    monkeypatch.setattr(tiny_model, "build_tiny_model", slow_build)
    barrier = threading.Barrier(4)
    results: list[Path | BaseException] = []

    def worker():
        barrier.wait()
        try:
            results.append(ensure_tiny_model(TEST_MODEL, cache_dir=tmp_path))
        except BaseException as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    expected = tiny_model_cache_path(TEST_MODEL, tmp_path)
    assert results == [expected] * 4
    assert calls == [TEST_MODEL]
    AutoModelForCausalLM.from_pretrained(expected)


def test_ensure_waits_for_a_build_holding_the_file_lock(tmp_path):
    final_dir = tiny_model_cache_path(TEST_MODEL, tmp_path)
    final_dir.parent.mkdir(parents=True)
    result: list[Path] = []
    with open(tiny_model._lock_path(final_dir), "a+") as held:
        # As another process would: same file, its own open file description.
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        thread = threading.Thread(
            target=lambda: result.append(ensure_tiny_model(TEST_MODEL, cache_dir=tmp_path)))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not result and not final_dir.exists()
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    thread.join(timeout=60)
    assert result == [final_dir]


def test_failed_build_leaves_no_partial_entry(tmp_path, monkeypatch):
    final_dir = tiny_model_cache_path(TEST_MODEL, tmp_path)
    final_dir.parent.mkdir(parents=True)
    # Leftover of a build that crashed earlier: cleaned up by the next build.
    (final_dir.parent / f".{final_dir.name}.tmp-crashed").mkdir()

    def failing_build(name, out):
        (Path(out) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_model, "build_tiny_model", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_model(TEST_MODEL, cache_dir=tmp_path)
    assert not final_dir.exists()
    assert [p.name for p in final_dir.parent.iterdir()] == [f".{final_dir.name}.lock"]
    monkeypatch.undo()
    assert ensure_tiny_model(TEST_MODEL, cache_dir=tmp_path) == final_dir
    assert (final_dir / "model.safetensors").is_file()


def test_changed_spec_gets_a_new_cache_entry(tmp_path, monkeypatch):
    before = tiny_model_cache_path(TEST_MODEL, tmp_path)
    spec = TINY_MODELS[TEST_MODEL]
    monkeypatch.setitem(TINY_MODELS, TEST_MODEL, type(spec)(**{**spec.__dict__, "seed": 99}))
    after = tiny_model_cache_path(TEST_MODEL, tmp_path)
    assert after.parent == before.parent and after != before
