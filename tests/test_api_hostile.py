"""A hand-written hostile list against the real facade: each gets a 4xx in SPEC §2.5's error shape
within seconds, and none starts a flow run (Prefect's own count, before and after).

``test_api_errors.py`` has the first, milder cases (missing key, empty images, a file: URL, a
non-image data: URI, three malformed bodies); this file adds what an attacker or a broken client
sends: bombs, huge and deep bodies, every field with the wrong type, odd ids on every id route.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from hostile_inputs import chunks, data_uri, gif_bomb, huge_json, jpeg_bomb, nested_json, png_bomb, small_jpeg
from stackserver import KEYS, RunningStack

KEY = KEYS[0]
LORA = "/api/v3/lora_fine_tune"
GOOD = {"key": KEY, "instance_prompt": "photo of sks person", "base_model_id": "tiny",
        "images": ["https://example.com/a.jpg"]}
JSON = {"Content-Type": "application/json"}
MB = 1024 * 1024

Request = Callable[[], dict[str, Any]]  # builds httpx.request(...) keyword arguments when the case runs


def body(payload: dict[str, Any], path: str = LORA) -> Request:
    return lambda: {"method": "POST", "url": path, "json": payload}


def raw(content: Callable[[], Any], path: str = LORA, headers: dict[str, str] | None = None) -> Request:
    return lambda: {"method": "POST", "url": path, "content": content(), "headers": {**JSON, **(headers or {})}}


def crop(image: Callable[[], str], **extra: Any) -> Request:
    return lambda: {"method": "POST", "url": "/api/v3/base64_crop", "json": {"key": KEY, "image": image(), **extra}}


def with_field(field: str, value: Any, path: str = LORA) -> Any:
    return pytest.param(body({**GOOD, field: value}, path), {400}, field, id=f"{path.rsplit('/', 1)[-1]}-{field}={str(value)[:24]!r}")


WRONG_TYPES = [
    with_field("instance_prompt", 123), with_field("instance_prompt", ["photo"]), with_field("instance_prompt", {"a": 1}),
    with_field("instance_prompt", None), with_field("class_prompt", []), with_field("class_prompt", 5),
    with_field("base_model_id", {"$ne": ""}), with_field("base_model_id", ["tiny"]),
    with_field("images", {"0": "https://example.com/a.jpg"}), with_field("images", 5), with_field("images", [1, 2]),
    with_field("images", [["https://example.com/a.jpg"]]), with_field("images", [None]), with_field("images", True),
    with_field("seed", -1), with_field("seed", 1.5), with_field("seed", []), with_field("seed", "1e3"),
    with_field("seed", 2**40), with_field("seed", 10**400),
    with_field("training_type", 5), with_field("training_type", ["men"]), with_field("training_type", "../men"),
    with_field("webhook", 5), with_field("webhook", ["https://example.com/hook"]), with_field("webhook", "javascript:alert(1)"),
    with_field("max_train_steps", 0), with_field("max_train_steps", -5), with_field("max_train_steps", 2.5),
    with_field("max_train_steps", "many"), with_field("max_train_steps", 10**30), with_field("max_train_steps", []),
    with_field("lora_type", "lokr"), with_field("lora_type", 5), with_field("base_model_type", "sd3"),
    with_field("negative_prompt", []), with_field("idempotency_key", 5), with_field("idempotency_key", "k" * 300),
    with_field("learning_rate_unet", "nan", "/api/v3/fine_tune_v2"), with_field("learning_rate_unet", "inf", "/api/v3/fine_tune_v2"),
    with_field("learning_rate_unet", 0, "/api/v3/fine_tune_v2"), with_field("learning_rate_unet", [], "/api/v3/fine_tune_v2"),
    with_field("steps_unet", 0, "/api/v3/fine_tune_v2"), with_field("steps_unet", 10**6, "/api/v3/fine_tune_v2"),
    with_field("steps_text_encoder", -1, "/api/v3/fine_tune_v2"), with_field("steps_text_encoder", 10**9, "/api/v3/fine_tune_v2"),
    with_field("max_train_steps", {"a": 1}, "/api/v3/fine_tune"),
    with_field("images", ["https://example.com/a.jpg"] * 1000), with_field("images", ["https://example.com/a.jpg"] * 31),
    with_field("images", ["https://example.com/\x00.jpg"]),
]

TEXT = [
    with_field("instance_prompt", "a" * 100_000), with_field("instance_prompt", "😀" * 2001),
    with_field("instance_prompt", "photo of\x00sks"), with_field("instance_prompt", "photo \x1b[31m red"),
    with_field("class_prompt", "é" * 100_000), with_field("negative_prompt", "\x7f"),
    with_field("base_model_id", "模型"), with_field("base_model_id", "../../etc/passwd"),
    with_field("base_model_id", "t" * 10_000),
    pytest.param(raw(lambda: b'{"key": "' + KEY.encode() + b'", "instance_prompt": "\\ud800 sks", "images": ["https://e.com/a.jpg"]}'),
                 {400}, "instance_prompt", id="lone-surrogate-prompt"),
]

IMAGES = [
    with_field("images", ["data:image/png;base64,@@@@"]), with_field("images", ["data:image/png;base64"]),
    with_field("images", ["data:image/png,%00%01not-an-image"]), with_field("images", ["data:image/png;base64,"]),
    with_field("images", [data_uri(b"\x89PNG\r\n\x1a\n")]),  # a PNG signature and nothing else
    with_field("images", [data_uri(b"MZ\x90\x00" + bytes(200), "image/jpeg")]),  # an executable, labelled JPEG
    with_field("images", [data_uri(b"%PDF-1.4\n" + bytes(100))]),
    pytest.param(lambda: {"method": "POST", "url": LORA, "json": {**GOOD, "images": [data_uri(png_bomb())]}},
                 {400}, "images", id="png-bomb-50000x50000"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "json": {**GOOD, "images": [data_uri(jpeg_bomb(), "image/jpeg")]}},
                 {400}, "images", id="jpeg-bomb-60000x60000"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "json": {**GOOD, "images": [data_uri(gif_bomb(), "image/gif")]}},
                 {400}, "images", id="gif-bomb-65535x65535"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "json": {
        **GOOD, "images": [data_uri(small_jpeg(), "image/jpeg"), data_uri(png_bomb(20_000, 20_000))]}},
                 {400}, "images", id="good-image-then-bomb"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "json": {**GOOD, "images": [data_uri(bytes(7 * MB))]}},
                 {413}, None, id="data-uri-7MB-body-cap"),
    pytest.param(crop(lambda: "@@@not base64@@@"), {400}, "image", id="crop-bad-base64"),
    pytest.param(crop(lambda: base64.b64encode(b"hello world, not an image").decode()), {400}, "image", id="crop-not-an-image"),
    pytest.param(crop(lambda: data_uri(b"\x89PNG\r\n\x1a\n" + bytes(5 * MB + 10))), {413}, None, id="crop-over-5MB"),
    pytest.param(crop(lambda: data_uri(png_bomb()), crop="false"), {413}, None, id="crop-png-bomb-no-crop"),
    pytest.param(crop(lambda: data_uri(png_bomb()), crop="true"), {413}, None, id="crop-png-bomb-crop"),
    pytest.param(crop(lambda: data_uri(jpeg_bomb(), "image/jpeg")), {413}, None, id="crop-jpeg-bomb"),
    pytest.param(crop(lambda: ""), {400}, "image", id="crop-empty-image"),
    pytest.param(crop(lambda: data_uri(small_jpeg(), "image/jpeg"), crop={"a": 1}), {400}, "crop", id="crop-crop-is-object"),
]

BODIES = [
    pytest.param(raw(lambda: nested_json(10_000, KEY)), {400}, "body", id="json-nested-10000"),
    pytest.param(raw(lambda: b"[" * 100_000 + b"]" * 100_000), {400}, "body", id="json-array-nested-100000"),
    pytest.param(raw(lambda: huge_json(20 * MB, KEY)), {413}, None, id="json-20MB-content-length"),
    pytest.param(raw(lambda: chunks(huge_json(20 * MB, KEY))), {413}, None, id="json-20MB-chunked"),
    pytest.param(raw(lambda: b'{"key": "' + KEY.encode() + b'", "seed": ' + b"9" * 5000 + b"}"), {400}, "body",
                 id="json-5000-digit-int"),
    pytest.param(raw(lambda: b'{"key": "' + KEY.encode() + b'", "seed": 1e999, "instance_prompt": "x", "images": "https://e.com/a.jpg"}'),
                 {400}, "seed", id="json-infinite-seed"),
    pytest.param(raw(lambda: b'{"key": "' + KEY.encode() + b'", "instance_prompt": "\xff\xfe"}'), {400}, "body", id="json-invalid-utf8"),
    pytest.param(raw(lambda: b"\x00" * 1000), {400}, "body", id="json-nul-bytes"),
    pytest.param(raw(lambda: b'{"key": "\\ud800"}', "/api/v3/finetune_list"), {401}, None, id="key-lone-surrogate"),
    pytest.param(body({"key": {"$ne": ""}}, "/api/v3/finetune_list"), {401}, None, id="key-is-object"),
    pytest.param(body({"key": [KEY]}, "/api/v3/finetune_list"), {401}, None, id="key-is-list"),
    pytest.param(body({"key": KEY + "\x00"}, "/api/v3/finetune_list"), {401}, None, id="key-with-nul"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "json": GOOD, "headers": {"Idempotency-Key": "k" * 1000}},
                 {400}, "Idempotency-Key", id="idempotency-header-1000-chars"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "content": b"--x\r\ngarbage",
                          "headers": {"Content-Type": "multipart/form-data; boundary=x", "Authorization": f"Bearer {KEY}"}},
                 {400}, None, id="multipart-garbage"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "data": {"key": KEY, "instance_prompt": "x",
                                                                    "images": ["https://example.com/a.jpg"] * 990}},
                 {400}, "images", id="form-990-images"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "data": {"key": KEY, "instance_prompt": "x",
                                                                    "images": ["https://example.com/a.jpg"] * 5000}},
                 {400}, "body", id="form-5000-fields"),
    pytest.param(lambda: {"method": "POST", "url": LORA, "data": {"key": KEY, "instance_prompt": "x", "images": []}},
                 {400}, "images", id="form-no-images"),
]

ID_ROUTES = ["/api/v3/fine_tune_status/", "/api/sandbox/v3/fine_tune_status/", "/api/v3/cancle_training/",
             "/api/v3/cancel_training/", "/api/v3/finetune/delete/"]
ODD_IDS = {
    "dotdot-slash": "../../etc/passwd", "encoded-dotdot": "%2e%2e", "encoded-traversal": "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "nul": "%00", "nul-inside": "abc%00def", "long-4000": "A" * 4000, "unicode": "%E6%A8%A1%E5%9E%8B%F0%9F%98%80",
    "invalid-utf8": "%ff%fe", "percent": "%25", "quote-sql": "x'%20OR%20'1'='1", "star": "*", "backslash": "..%5C..%5Cwin",
}
IDS = [pytest.param(lambda p=path + odd: {"method": "POST", "url": p, "json": {"key": KEY}}, {404}, None,
                    id=f"{path.strip('/').replace('/api/', '').replace('/', '_')}-{name}") for path in ID_ROUTES for name, odd in ODD_IDS.items()]

DOWNLOADS = [
    pytest.param(lambda q=query: {"method": "GET", "url": "/files/" + q}, codes, None, id=f"files-{name}")
    for name, query, codes in [
        ("dotdot", "../../etc/passwd?expires=1&signature=x", {403, 404}),
        ("encoded-dotdot", "%2e%2e/%2e%2e/etc/passwd?expires=9999999999&signature=x", {403}),
        ("nul", "trainings/a%00b/manifest.json?expires=9999999999&signature=x", {403}),
        ("expires-not-int", "trainings/a/manifest.json?expires=soon&signature=x", {400}),
        ("expires-huge", "trainings/a/manifest.json?expires=" + "9" * 400 + "&signature=x", {400, 403}),
        ("no-query", "trainings/a/manifest.json", {400}),
        ("long-key", "a" * 4000 + "?expires=1&signature=x", {403}),
    ]
]


def _send(stack: RunningStack, build: Request) -> httpx.Response:
    with stack.client() as client:
        return client.request(**build())


@pytest.mark.parametrize(("build", "codes", "field"), WRONG_TYPES + TEXT + IMAGES + BODIES + IDS + DOWNLOADS)
def test_hostile_input_gets_a_clear_4xx_and_starts_nothing(
    stack: RunningStack, build: Request, codes: set[int], field: str | None
) -> None:
    before = stack.flow_run_count()
    response = _send(stack, build)
    assert response.status_code in codes, response.text[:500]
    error = response.json()
    assert error["status"] == "error" and error["messege"] == error["message"] and error["message"], error
    assert "Traceback" not in response.text and len(response.content) < 20_000
    if field is not None:
        assert any(name == field or name.startswith(f"{field}.") for name in error.get("errors", {})), error
    if response.status_code == 429:
        assert response.headers["Retry-After"].isdigit()
    assert stack.flow_run_count() == before


def test_wrong_methods_get_405_with_allow_in_the_error_shape(stack: RunningStack) -> None:
    with stack.client() as client:
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            response = client.request(method, LORA)
            assert response.status_code == 405 and response.headers["allow"] == "POST", response.text
            assert response.json()["status"] == "error"
