"""Key isolation on the real stack: one API key cannot see, cancel, delete or download another
key's training, and a download link opens only the file it was signed for, until it expires.
"""

from __future__ import annotations

import time
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import pytest
from stackserver import KEYS, RunningStack, data_uri

from api.examples import CREATE_EXAMPLES
from tasks.sample_photos import write_sample_photos

ALICE, BOB = KEYS


@pytest.fixture(scope="module")
def alices_training(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    photos = write_sample_photos(tmp_path_factory.mktemp("isolation-photos"), count=2)
    body = {**CREATE_EXAMPLES["sandbox"], "key": ALICE, "images": [data_uri(p) for p in photos]}
    with stack.client() as client:
        training_id = client.post("/api/sandbox/v3/fine_tune", json=body).json()["training_id"]
    status, _ = stack.wait_until_done(training_id, ALICE)
    assert status["training_status"] == "model_ready", status
    return training_id, status


@pytest.mark.parametrize("route", [
    "/api/v3/fine_tune_status/{id}", "/api/sandbox/v3/fine_tune_status/{id}", "/api/v3/cancel_training/{id}",
    "/api/v3/cancle_training/{id}", "/api/v3/finetune/delete/{id}",
])
def test_another_key_gets_404_and_changes_nothing(stack: RunningStack, alices_training: tuple[str, dict],
                                                 route: str) -> None:
    training_id, before = alices_training
    with stack.client() as client:
        answer = client.post(route.format(id=training_id), json={"key": BOB})
        bearer = client.post(route.format(id=training_id), json={}, headers={"Authorization": f"Bearer {BOB}"})
        listed = client.post("/api/v3/finetune_list", json={"key": BOB}).json()["data"]
        after = client.post(f"/api/v3/fine_tune_status/{training_id}", json={"key": ALICE}).json()
    for response in (answer, bearer):  # the same answer as for an id that does not exist
        assert response.status_code == 404 and response.json()["messege"] == "Model id not found", response.text
    assert training_id not in listed
    assert after["training_status"] == "model_ready"
    assert stack.store.list(f"trainings/{training_id}/"), "alice's files must be untouched"
    assert set(after["links"]) == set(before["links"])


def test_a_link_opens_only_its_own_file_and_expires(stack: RunningStack, alices_training: tuple[str, dict]) -> None:
    training_id, status = alices_training
    link = next(iter(status["links"].values()))
    assert httpx.get(link, timeout=10).status_code == 200
    signed = urlsplit(link)
    other_key = next(k for k in stack.store.list(f"trainings/{training_id}/") if quote(k) not in signed.path)
    bucket = signed.path.split("/")[1]
    forged = urlunsplit(signed._replace(path=f"/{bucket}/{quote(other_key)}"))  # same signature, other file
    assert httpx.get(forged, timeout=10).status_code == 403  # the signature covers the object key
    # A signature's date has whole seconds: a link signed for 1 s may be expired at once (a CI run
    # failed on it). One signed for 3 s lives 2-3 s.
    signed_at = time.monotonic()
    short = stack.store.link(other_key, 3)
    assert httpx.get(short, timeout=10).status_code == 200
    time.sleep(max(0.0, signed_at + 4.5 - time.monotonic()))
    assert httpx.get(short, timeout=10).status_code == 403
