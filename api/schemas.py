"""Request and response models of the facade, lenient the way the original API is.

Numbers and booleans may arrive as strings, ``""``/``"null"`` mean "not given", unknown fields
are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from flows.netguard import http_url_problem

NULLISH = {"", "null", "none", "undefined"}
DATA_IMAGE = "data:image/"
MAX_PROMPT_CHARS = 2000


def _nullish(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in NULLISH:
        return None
    return value


def _image_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value


def is_clean_text(value: str) -> bool:
    """Valid Unicode (no lone surrogates, so it encodes to UTF-8) without control characters other than
    tab and newlines: what may go into flow parameters, tags, prompts and object keys."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(ch) < 32 and ch not in "\t\n\r" or ord(ch) == 127 for ch in value)


def _clean(value: Any) -> Any:
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(text, str) and not is_clean_text(text) for text in texts):
        raise ValueError("contains control characters or invalid Unicode")
    return value


class ClientRequest(BaseModel):
    """Fields every authenticated call may carry."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    key: str | None = Field(None, description="API key (or send `Authorization: Bearer <key>`).")

    @field_validator("*", mode="after")
    @classmethod
    def _check_text(cls, value: Any) -> Any:
        return _clean(value)


def _default(value: Any, default: Any) -> Any:
    return default if _nullish(value) is None else value


Nullable = BeforeValidator(_nullish)


def _not_boolean(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read true as 1: a seed or a step count sent as a flag is a mistake
        raise ValueError("must be a number, not true or false")
    return value


Number = BeforeValidator(_not_boolean)


class TrainingRequest(ClientRequest):
    """Fields shared by every create call."""

    instance_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["photo of ambika0 man"])
    class_prompt: Annotated[str | None, Nullable] = Field(None, max_length=MAX_PROMPT_CHARS, examples=["photo of man"])
    base_model_id: Annotated[str | None, Nullable] = Field(None, max_length=128, examples=["sd-1.5"])
    images: Annotated[list[str], BeforeValidator(_image_list)] = Field(min_length=1, examples=[["https://example.com/1.jpg"]])
    seed: Annotated[int | None, Nullable, Number] = Field(None, ge=0, le=2**32 - 1, examples=["0"])
    training_type: Annotated[Literal["men", "female", "women", "couple"] | None, Nullable] = Field(None, examples=["men"])
    webhook: Annotated[str | None, Nullable] = Field(None, max_length=2048)
    idempotency_key: Annotated[str | None, Nullable] = Field(None, max_length=255)

    @field_validator("images")
    @classmethod
    def _check_images(cls, images: list[str]) -> list[str]:
        problems = [f"entry {i}: {problem}" for i, url in enumerate(images) if (problem := _image_problem(url))]
        if problems:
            raise ValueError("; ".join(problems))
        return images

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, url: str | None) -> str | None:
        problem = None if url is None else http_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url


def _image_problem(url: Any) -> str | None:
    """Why an ``images`` entry cannot be used: neither a ``data:image/`` URI nor a well-formed http(s) URL."""
    if not isinstance(url, str):
        return "not a string"
    if url.startswith(DATA_IMAGE):
        return None
    if not url.lower().startswith(("http://", "https://")):
        return "not an http(s) URL or a data:image URI"
    return http_url_problem(url)


class DreamBoothRequest(TrainingRequest):
    """Fields of both DreamBooth calls."""

    half_precision: Annotated[bool, BeforeValidator(lambda v: _default(v, False))] = Field(
        False, description="dreamflow's addition: export the checkpoint and the diffusers folder in fp16 "
                           "(half the size: about 2 GB instead of 4 GB each for an SD 1.5 model).")


class FineTuneRequest(DreamBoothRequest):
    """Body of ``/api/v3/fine_tune`` (DreamBooth)."""

    max_train_steps: Annotated[int | None, Nullable, Number] = Field(None, ge=1, examples=["2000"])


class FineTuneV2Request(DreamBoothRequest):
    """Body of ``/api/v3/fine_tune_v2``: separate UNet / text-encoder rates and step counts."""

    learning_rate_unet: Annotated[float, BeforeValidator(lambda v: _default(v, 1e-6)), Number] = Field(1e-6, gt=0, le=1)
    steps_unet: Annotated[int, BeforeValidator(lambda v: _default(v, 1500)), Number] = Field(1500, ge=1)
    learning_rate_text_encoder: Annotated[float, BeforeValidator(lambda v: _default(v, 1e-6)), Number] = Field(1e-6, gt=0, le=1)
    steps_text_encoder: Annotated[int, BeforeValidator(lambda v: _default(v, 350)), Number] = Field(350, ge=0)


class LoraFineTuneRequest(TrainingRequest):
    """Body of ``/api/v3/lora_fine_tune``."""

    base_model_type: Annotated[Literal["normal", "sdxl"], BeforeValidator(lambda v: _default(v, "normal"))] = "normal"
    negative_prompt: Annotated[str | None, Nullable] = Field(None, max_length=MAX_PROMPT_CHARS)
    lora_type: Annotated[Literal["lora", "lycoris"], BeforeValidator(lambda v: _default(v, "lora"))] = "lora"
    max_train_steps: Annotated[int | None, Nullable, Number] = Field(None, ge=1, examples=["2000"])


class Base64CropRequest(ClientRequest):
    """Body of ``/api/v3/base64_crop``."""

    image: str = Field(min_length=1, description="A data: URI or bare base64, at most 5 MB decoded.")
    crop: Annotated[bool, BeforeValidator(lambda v: _default(v, True))] = True

class CreatedPublic(BaseModel):
    """Answer to a create call."""

    status: Literal["success"] = "success"
    messege: str = "deploying_gpu"
    data: str
    training_id: str
    model_id: str


class MessagePublic(BaseModel):
    """Answer to cancel and delete."""

    status: Literal["success"] = "success"
    messege: str
    data: str


class UploadPublic(BaseModel):
    """Answer to ``base64_crop``."""

    status: Literal["success"] = "success"
    messege: str = "image uploaded"
    link: str
    request_id: int


class ProgressPublic(BaseModel):
    step: int
    total_steps: int
    percent: float


class StatusPublic(BaseModel):
    """Answer to ``fine_tune_status``: the original's fields, then dreamflow's additions."""

    status: Literal["success"] = "success"
    messege: str
    training_status: str
    data: str
    model_id: str
    progress: ProgressPublic
    eta_seconds: int | None
    error: str | None
    links: dict[str, Any]
    test_image: str | None


class ListPublic(BaseModel):
    status: Literal["success"] = "success"
    messege: str = "model list"
    data: list[str]


class ErrorPublic(BaseModel):
    status: Literal["error"] = "error"
    messege: str
    message: str
    errors: dict[str, list[str]] | None = None
