"""Example bodies of the original API's documentation, shown in the OpenAPI page (/docs)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

IMAGES = [
    "https://example.com/photos/1.jpeg",
    "https://example.com/photos/2.jpeg",
    "https://example.com/photos/3.jpeg",
]

CREATE_EXAMPLES: dict[str, dict[str, Any]] = {
    "fine_tune": {
        "key": "", "instance_prompt": "photo of ambika0 man", "class_prompt": "photo of a man",
        "base_model_id": "sd-1.5", "images": IMAGES, "seed": "0", "training_type": "men",
        "max_train_steps": "2000", "webhook": None,
    },
    "fine_tune_v2": {
        "key": "", "instance_prompt": "photo of ambika0 man", "class_prompt": "photo of a man",
        "base_model_id": "sd-1.5", "images": IMAGES, "seed": "0", "training_type": "men",
        "learning_rate_unet": "1e-6", "steps_unet": "1500", "learning_rate_text_encoder": "1e-6",
        "steps_text_encoder": "350", "webhook": None,
    },
    "lora_fine_tune": {
        "key": "", "instance_prompt": "photo of ambika0 man", "class_prompt": "photo of a man",
        "base_model_type": "normal", "negative_prompt": " lowres, bad anatomy, bad hands, text, error",
        "images": IMAGES, "seed": "0", "training_type": "men", "lora_type": "lora",
        "max_train_steps": "2000", "webhook": None,
    },
    "sandbox": {
        "key": "", "instance_prompt": "photo of ambika0 man", "class_prompt": "photo of a man",
        "images": IMAGES, "seed": "0", "training_type": "men", "webhook": None,
    },
}
KEY_ONLY_EXAMPLE: dict[str, Any] = {"key": ""}
BASE64_CROP_EXAMPLE: dict[str, Any] = {"key": "", "image": "data:image/png;base64,iVBORw0KGgo...", "crop": "true"}


def openapi_body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body the route reads itself (JSON or form-encoded)."""
    schema = model.model_json_schema()
    content = {"schema": schema, "example": example}
    return {"requestBody": {"required": True, "content": {
        "application/json": content, "application/x-www-form-urlencoded": content,
    }}}
