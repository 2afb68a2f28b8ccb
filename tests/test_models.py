"""Base models a worker cannot read fail with words a user can act on, before any weights load."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from flows.registry import BaseModelEntry, ModelSource, load_registry
from tasks.models import ModelUnavailable, resolve_pretrained


def test_a_hub_model_missing_from_the_cache_while_the_hub_is_off_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert constants.HF_HUB_OFFLINE  # the tests run offline, as every machine here must
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelUnavailable, match=r"'sd-1.5' .* not in this worker's model cache .*HF_HUB_OFFLINE=1"):
        resolve_pretrained(load_registry()["sd-1.5"])


def test_a_hub_model_in_the_cache_is_used_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub cache's own layout: refs/main names the snapshot that holds the files.
    repo = tmp_path / "models--someone--portrait-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model_index.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    entry = BaseModelEntry(id="portrait", family="sd15", resolution=512,
                           source=ModelSource(kind="hub", ref="someone/portrait-model"))
    assert resolve_pretrained(entry) == "someone/portrait-model"


def test_a_missing_local_folder_says_so(tmp_path: Path) -> None:
    entry = BaseModelEntry(id="mine", family="sd15", resolution=512,
                           source=ModelSource(kind="folder", ref=str(tmp_path / "nowhere")))
    with pytest.raises(ModelUnavailable, match="its folder .*nowhere does not exist on this worker"):
        resolve_pretrained(entry)
