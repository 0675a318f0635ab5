"""The bad-input catalogue: requests a server must refuse with the right 4xx and an OpenAI-shaped body.

Each case is (name, method, path, body, status): body is a dict (sent as JSON), bytes (sent raw as
application/json), or a callable of the adapter root that returns a dict (hostile adapter loads, whose
directories `hostile_adapters` makes). docs/reliability.md lists the catalogue by group.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

VOCAB = 512  # the tiny checkpoints' vocabulary (moeserve.tiny)
CONTEXT = 128  # the test servers' max_model_len

CMPL = {"model": "base", "prompt": "hello", "max_tokens": 2}
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


def _with(base: dict, fields: dict) -> dict:
    """base with these fields set (or removed, where the value is _DROP)."""
    body = {**base, **fields}
    return {k: v for k, v in body.items() if v is not _DROP}


def _c(**fields) -> dict:
    return _with(CMPL, fields)


def _chat(**fields) -> dict:
    return _with(CHAT, fields)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


_DROP = object()
C, CH, LOAD = "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter"


def catalogue() -> list[tuple[str, str, str, object, int]]:
    cases: list[tuple[str, str, str, object, int]] = []

    def add(name, body, status=400, path=C, method="POST"):
        cases.append((name, method, path, body, status))

    # --- types ---
    for field, value in [
        ("temperature", "hot"), ("temperature", [1]), ("top_p", "x"), ("n", "two"), ("n", 1.5),
        ("max_tokens", 2.5), ("max_tokens", "many"), ("seed", "s"), ("seed", 1.5), ("stop", 5), ("stop", [1, 2]),
        ("logprobs", "a"), ("prompt", 5), ("prompt", None), ("prompt", {"a": 1}), ("prompt", [1.5]),
        ("prompt", [[1, 2], ["a"]]), ("model", 5), ("model", ["base"]), ("top_k", "all"), ("stream", {"x": 1}),
        ("stop_token_ids", "1"), ("stream_options", "yes"), ("echo", [True]),
    ]:  # fmt: skip
        add(f"type {field}={value!r}", _c(**{field: value}))
    add("misspelt field", _c(temprature=0.5))
    add("missing prompt", _c(prompt=_DROP))
    # --- ranges ---
    for field, value in [
        ("temperature", -1), ("temperature", 101), ("top_p", 0), ("top_p", 1.5), ("top_p", -0.1), ("top_k", -2),
        ("top_k", VOCAB + 1), ("top_k", 2**63 - 1), ("top_k", 2**64), ("min_p", -0.1), ("min_p", 1.1),
        ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", 101),
        ("presence_penalty", 2.5), ("presence_penalty", -3), ("frequency_penalty", 3), ("seed", 2**63),
        ("seed", -(2**63) - 1), ("n", 0), ("n", 129), ("logprobs", -1), ("logprobs", 21), ("max_tokens", -100),
        ("max_tokens", -1), ("max_tokens", CONTEXT), ("max_tokens", 2**63), ("best_of", 0), ("best_of", 2),
        ("suffix", "x"), ("stop", [""]), ("stop", ["s"] * 65), ("stop", "s" * 2000), ("stop_token_ids", [-1]),
        ("stop_token_ids", [VOCAB]), ("stop_token_ids", [1] * 2000), ("prompt", [-1]), ("prompt", [VOCAB]),
        ("prompt", [10**12]), ("prompt", [[]]), ("prompt", []),
    ]:  # fmt: skip
        add(f"range {field}={str(value)[:24]}", _c(**{field: value}))
    add("NaN temperature", b'{"model": "base", "prompt": "x", "temperature": NaN}')
    add("Infinity top_p", b'{"model": "base", "prompt": "x", "top_p": Infinity}')
    add("-Infinity penalty", b'{"model": "base", "prompt": "x", "presence_penalty": -Infinity}')
    add("stream of two prompts", _c(prompt=["a", "b"], stream=True))
    # --- sizes ---
    add("10 MB prompt", _c(prompt="x" * 10_000_000))
    add("10 MB prompt, streamed", _c(prompt="y" * 10_000_000, stream=True))
    add("prompt longer than the context", _c(prompt="word " * 300))
    add("prompt longer than the context, streamed", _c(prompt="word " * 300, stream=True))
    add("token prompt longer than the context", _c(prompt=[1] * (CONTEXT + 5)))
    add("prompt + max_tokens beyond the context", _c(prompt=[1] * 100, max_tokens=40))
    add("300 prompts in a batch", _c(prompt=["a"] * 300))
    add("10 MB chat message", _chat(messages=[{"role": "user", "content": "z" * 10_000_000}]), path=CH)
    add("4097 chat messages", _chat(messages=[{"role": "user", "content": "a"}] * 4097), path=CH)
    add("chat max_completion_tokens beyond the context", _chat(max_completion_tokens=CONTEXT), path=CH)
    # --- encodings and bodies ---
    add("lone surrogate prompt", _raw('{"model": "base", "prompt": "\\ud800"}'))
    add("lone surrogate stop", _raw('{"model": "base", "prompt": "x", "stop": "\\udfff"}'))
    add("lone surrogate chat content", _raw(json.dumps({**CHAT, "messages": [{"role": "user", "content": "@"}]})
        .replace('"@"', '"\\udc80"')), path=CH)  # fmt: skip
    add("invalid UTF-8 body", b'{"model": "base", "prompt": "\xff\xfe"}')
    add("latin-1 body", '{"model": "base", "prompt": "caf\xe9"}'.encode("latin-1"))
    add("not JSON", b"{not json")
    add("empty body", b"")
    add("JSON array body", b"[1, 2]")
    add("JSON string body", b'"hello"')
    add("JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000)
    add("object nested 5000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000)
    # --- chat roles and content ---
    for name, messages in [
        ("unknown role", [{"role": "wizard", "content": "x"}]), ("missing role", [{"content": "x"}]),
        ("role not a string", [{"role": 5, "content": "x"}]), ("no messages", []), ("messages a string", "hi"),
        ("content a number", [{"role": "user", "content": 5}]),
        ("image content part", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ("content part without type", [{"role": "user", "content": [{"text": "x"}]}]),
        ("name not a string", [{"role": "user", "content": "x", "name": 5}]),
        ("message not an object", ["hello"]),
    ]:  # fmt: skip
        add(f"chat {name}", _chat(messages=messages), path=CH)
    for field, value in [
        ("top_logprobs", 21), ("top_logprobs", -1), ("logprobs", "x"), ("max_completion_tokens", 0),
        ("tools", [{"type": "function", "function": {"name": "f"}}]), ("max_tokens", -5), ("n", 0),
    ]:  # fmt: skip
        add(f"chat {field}={value!r}", _chat(**{field: value}), path=CH)
    # --- routes and methods ---
    for method, path, status in [
        ("GET", "/nope", 404), ("POST", "/v1/nope", 404), ("GET", "/v1/completions", 405),
        ("PUT", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405), ("GET", LOAD, 405),
        ("PATCH", "/health", 405),
    ]:  # fmt: skip
        cases.append((f"{method} {path}", method, path, None, status))
    # --- unknown adapters ---
    add("unknown model", _c(model="nope"), 404)
    add("unknown model, streamed", _c(model="nope", stream=True), 404)
    add("unknown chat model", _chat(model="nope"), 404, path=CH)
    add("empty model name", _c(model=""), 404)
    add("model name with NUL", _c(model="es\x00ft"), 404)
    add("unload unknown adapter", {"lora_name": "nope"}, 404, path="/v1/unload_lora_adapter")
    # --- hostile adapter loads ---
    for name, status in HOSTILE:
        add(f"load {name}", _load(name), status, path=LOAD)
    return cases


HOSTILE = [
    ("outside the allowed dirs", 400), ("dotdot escape", 400), ("path with NUL", 400), ("empty name", 400),
    ("base model's name", 400), ("name of 201 chars", 400), ("empty path", 400), ("missing path", 400),
    ("nonexistent dir", 400), ("corrupt safetensors", 400), ("no adapter_config.json", 400),
    ("config not JSON", 400), ("config a JSON array", 400), ("config without method", 400),
    ("rank 'eight'", 400), ("unknown method", 400), ("top_k 1000000", 400), ("num_experts per layer mislisted", 400),
    ("unknown config field", 400), ("rank differing from the tensors", 400), ("weights symlinked outside", 400),
    ("dir symlinked outside", 400), ("name already loaded", 400), ("weights larger than the limits", 400),
    ("ESFT expert out of range", 400), ("ESFT expert list mismatch", 400), ("NaN weights", 400),
    ("PEFT IA3 type", 400), ("num_experts a bool", 400), ("alpha negative", 400), ("PEFT config without r", 400),
    ("PEFT r a string", 400), ("PEFT lora_alpha a string", 400), ("PEFT target_modules a number", 400),
]  # fmt: skip


def _load(name: str):
    def body(root: Path) -> dict:
        special = {
            "outside the allowed dirs": {"lora_name": "h", "lora_path": "/etc"},
            "dotdot escape": {"lora_name": "h", "lora_path": str(root / ".." / "..")},
            "path with NUL": {"lora_name": "h", "lora_path": str(root / "molora") + "\x00x"},
            "empty name": {"lora_name": "", "lora_path": str(root / "molora")},
            "base model's name": {"lora_name": "base", "lora_path": str(root / "molora")},
            "name of 201 chars": {"lora_name": "n" * 201, "lora_path": str(root / "molora")},
            "empty path": {"lora_name": "h", "lora_path": ""},
            "missing path": {"lora_name": "h"},
            "nonexistent dir": {"lora_name": "h", "lora_path": str(root / "does-not-exist")},
            "name already loaded": {"lora_name": "esft", "lora_path": str(root / "molora")},
        }
        return special.get(name) or {"lora_name": "h", "lora_path": str(root / "hostile" / _slug(name))}

    return body


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name)


def _edit_config(d: Path, **fields) -> None:
    data = json.loads((d / "adapter_config.json").read_text())
    data.update(fields)
    (d / "adapter_config.json").write_text(json.dumps(data))


def hostile_adapters(root: Path, outside: Path) -> None:
    """Writes root/hostile/<case>: broken copies of root/molora (MoLoRA) and root/esft (ESFT); `outside` is a
    directory outside the allowed ones."""
    molora, esft, lora = root / "molora", root / "esft", root / "lora"
    base = root / "hostile"

    def copy(name: str, src: Path = molora) -> Path:
        return Path(shutil.copytree(src, base / _slug(name)))

    (copy("corrupt safetensors") / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (copy("no adapter_config.json") / "adapter_config.json").unlink()
    (copy("config not JSON") / "adapter_config.json").write_text("{method: molora")
    (copy("config a JSON array") / "adapter_config.json").write_text("[1, 2]")
    d = copy("config without method")
    data = json.loads((d / "adapter_config.json").read_text())
    del data["method"]
    (d / "adapter_config.json").write_text(json.dumps(data))
    _edit_config(copy("rank 'eight'"), rank="eight")
    _edit_config(copy("unknown method"), method="mixture-of-wizards")
    _edit_config(copy("top_k 1000000"), top_k=1_000_000)
    _edit_config(copy("num_experts per layer mislisted"), num_experts=[2, 2, 2, 2, 2, 2, 2, 2, 2])
    _edit_config(copy("unknown config field"), flux_capacitor=True)
    _edit_config(copy("rank differing from the tensors"), rank=3)
    _edit_config(copy("num_experts a bool"), num_experts=True)
    _edit_config(copy("alpha negative"), alpha=-4.0)
    d = copy("weights symlinked outside")
    shutil.copy(d / "adapter_model.safetensors", outside / "weights.safetensors")
    (d / "adapter_model.safetensors").unlink()
    os.symlink(outside / "weights.safetensors", d / "adapter_model.safetensors")
    shutil.copytree(molora, outside / "adapter")
    os.symlink(outside / "adapter", base / _slug("dir symlinked outside"))
    d = copy("weights larger than the limits")
    with open(d / "adapter_model.safetensors", "r+b") as f:
        f.truncate(64 * 2**30)  # sparse: 64 GiB claimed, nothing written
    d = copy("ESFT expert out of range", esft)
    data = json.loads((d / "adapter_config.json").read_text())
    layer = next(iter(data["experts"]))
    data["experts"][layer] = [10_000]
    (d / "adapter_config.json").write_text(json.dumps(data))
    d = copy("ESFT expert list mismatch", esft)
    data = json.loads((d / "adapter_config.json").read_text())
    data["experts"][layer] = data["experts"][layer][:1]
    (d / "adapter_config.json").write_text(json.dumps(data))
    d = copy("NaN weights")
    tensors = load_file(d / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A"))
    tensors[key][0, 0, 0] = float("nan")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    _edit_config(copy("PEFT IA3 type"), peft_type="IA3")
    d = copy("PEFT config without r", lora)
    data = json.loads((d / "adapter_config.json").read_text())
    del data["r"]
    (d / "adapter_config.json").write_text(json.dumps(data))
    _edit_config(copy("PEFT r a string", lora), r="8")
    _edit_config(copy("PEFT lora_alpha a string", lora), lora_alpha="16")
    _edit_config(copy("PEFT target_modules a number", lora), target_modules=7)
