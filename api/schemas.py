"""Request and response models of the facade, lenient the way the original API is.

Numbers and booleans may arrive as strings, ``""``/``"null"`` mean "not given", unknown fields
are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

NULLISH = {"", "null", "none", "undefined"}
IMAGE_SCHEMES = ("http://", "https://", "data:image/")
MAX_PROMPT_CHARS = 2000


def _nullish(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in NULLISH:
        return None
    return value


def _image_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value




class ClientRequest(BaseModel):
    """Fields every authenticated call may carry."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    key: str | None = Field(None, description="API key (or send `Authorization: Bearer <key>`).")


class LoraFineTuneRequest(ClientRequest):
    """Body of ``/api/v3/lora_fine_tune``."""

    instance_prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, examples=["photo of ambika0 man"])
    class_prompt: Annotated[str | None, BeforeValidator(_nullish)] = Field(None, max_length=MAX_PROMPT_CHARS, examples=["photo of man"])
    base_model_type: Annotated[Literal["normal", "sdxl"], BeforeValidator(lambda v: _nullish(v) or "normal")] = "normal"
    base_model_id: Annotated[str | None, BeforeValidator(_nullish)] = Field(None, max_length=128)
    negative_prompt: Annotated[str | None, BeforeValidator(_nullish)] = Field(None, max_length=MAX_PROMPT_CHARS)
    images: Annotated[list[str], BeforeValidator(_image_list)] = Field(min_length=1, examples=[["https://example.com/1.jpg"]])
    seed: Annotated[int | None, BeforeValidator(_nullish)] = Field(None, ge=0, le=2**32 - 1)
    training_type: Annotated[Literal["men", "female", "women", "couple"] | None, BeforeValidator(_nullish)] = None
    lora_type: Annotated[Literal["lora", "lycoris"], BeforeValidator(lambda v: _nullish(v) or "lora")] = "lora"
    max_train_steps: Annotated[int | None, BeforeValidator(_nullish)] = Field(None, ge=1)
    webhook: Annotated[str | None, BeforeValidator(_nullish)] = Field(None, max_length=2048)
    idempotency_key: Annotated[str | None, BeforeValidator(_nullish)] = Field(None, max_length=255)

    @field_validator("images")
    @classmethod
    def _check_images(cls, images: list[str]) -> list[str]:
        bad = [i for i, url in enumerate(images) if not isinstance(url, str) or not url.startswith(IMAGE_SCHEMES)]
        if bad:
            raise ValueError(f"entries {bad} are not http(s) URLs or data:image URIs")
        return images

    @field_validator("webhook")
    @classmethod
    def _check_webhook(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return url


class CreatedPublic(BaseModel):
    """Answer to a create call."""

    status: Literal["success"] = "success"
    messege: str = "deploying_gpu"
    data: str
    training_id: str
    model_id: str


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
