"""The status fast path answers exactly what the FastAPI route answers, over real HTTP.

A second facade runs in this process (uvicorn on a free port, in a thread) on the session stack's
Prefect server and S3 store, so the test can read the fast path's counts from the app's state.
Each answer the fast path gives (a JSON body) is compared byte for byte, headers included, with the
route's answer to the same request sent as a form (forms always take the FastAPI route).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from stackserver import KEYS, RunningStack, data_uri

from api.app import create_app
from api.examples import CREATE_EXAMPLES
from api.fastpath import FastPathCounts
from deployments.stack import free_ports
from tasks.sample_photos import write_sample_photos

ALICE, BOB = KEYS
ROUTES = ("/api/v3/fine_tune_status/{id}", "/api/sandbox/v3/fine_tune_status/{id}")
COMPARED_HEADERS = ("content-type", "content-length")


class InProcessFacade:
    """``create_app`` served by uvicorn in a thread of the test process."""

    def __init__(self, stack: RunningStack) -> None:
        (port,) = free_ports(1)
        self.app = create_app(stack.settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, loop="uvloop",
                                                    http="httptools", access_log=False, log_level="warning"))
        self.base_url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessFacade:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the in-process facade did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def counts(self) -> FastPathCounts:
        return self.app.state.status_fast_path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)


@pytest.fixture(scope="module")
def facade(stack: RunningStack) -> Iterator[InProcessFacade]:
    with InProcessFacade(stack) as running:
        yield running


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("fastpath-photos"), count=2)


@pytest.fixture(scope="module")
def ready_training(stack: RunningStack, photos: list[Path]) -> str:
    body = {**CREATE_EXAMPLES["sandbox"], "key": ALICE, "images": [data_uri(p) for p in photos]}
    with stack.client() as client:
        training_id = client.post("/api/sandbox/v3/fine_tune", json=body).json()["training_id"]
    status, _ = stack.wait_until_done(training_id, ALICE)
    assert status["training_status"] == "model_ready", status
    return training_id


def fast(client: httpx.Client, url: str, key: str | None, bearer: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return client.post(url, json={"key": key} if key is not None else {}, headers=headers)


def slow(client: httpx.Client, url: str, key: str | None, bearer: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return client.post(url, data={"key": key} if key is not None else {"other": "field"}, headers=headers)


def same_answer(facade: InProcessFacade, url: str, key: str | None, bearer: str | None = None,
                fast_expected: bool = True) -> httpx.Response:
    """The fast answer, once two route answers around it agree (no refresh in between); asserts they match it."""
    with facade.client() as client:
        fast(client, url, key, bearer)  # warms the gateway's and the status cache for this caller
        for _ in range(40):
            before = slow(client, url, key, bearer)
            counts = (facade.counts.answered, facade.counts.handed_on)
            answer = fast(client, url, key, bearer)
            after_counts = (facade.counts.answered, facade.counts.handed_on)
            after = slow(client, url, key, bearer)
            if before.content == after.content:
                break
        else:
            raise AssertionError(f"the route's answer changed on every try: {before.text[:300]}")
    assert answer.status_code == before.status_code
    assert answer.content == before.content
    assert [answer.headers.get(h) for h in COMPARED_HEADERS] == [before.headers.get(h) for h in COMPARED_HEADERS]
    took = "answered" if after_counts[0] == counts[0] + 1 else "handed_on" if after_counts[1] == counts[1] + 1 else None
    assert took == ("answered" if fast_expected else "handed_on"), (counts, after_counts)
    return answer


@pytest.mark.parametrize("route", ROUTES)
def test_a_ready_training_gets_the_routes_bytes(facade: InProcessFacade, ready_training: str, route: str) -> None:
    answer = same_answer(facade, route.format(id=ready_training), ALICE)
    body = answer.json()
    assert answer.status_code == 200 and body["training_status"] == "model_ready" and body["links"]


def test_a_bearer_key_gets_the_same_answer(facade: InProcessFacade, ready_training: str) -> None:
    answer = same_answer(facade, ROUTES[0].format(id=ready_training), None, bearer=ALICE)
    assert answer.json()["model_id"] == ready_training


@pytest.mark.parametrize(("key", "bearer"), [("not-a-key", None), (None, None), (None, "not-a-key"), (" ", None)])
def test_a_bad_or_missing_key_is_the_same_401(facade: InProcessFacade, ready_training: str,
                                              key: str | None, bearer: str | None) -> None:
    answer = same_answer(facade, ROUTES[0].format(id=ready_training), key, bearer)
    assert answer.status_code == 401 and answer.json()["messege"] == "Invalid Api Key"


@pytest.mark.parametrize("route", ROUTES)
def test_another_owners_and_unknown_ids_are_the_same_404(facade: InProcessFacade, ready_training: str,
                                                         route: str) -> None:
    for training_id, key in ((ready_training, BOB), ("no-such-id", ALICE), ("x" * 80, ALICE)):
        answer = same_answer(facade, route.format(id=training_id), key, fast_expected=False)
        assert answer.status_code == 404 and answer.json()["messege"] == "Model id not found"


@pytest.mark.parametrize(("content", "content_type"), [
    (b'{"key": ', "application/json"), (b'["key"]', "application/json"), (b'{"key": "a"', "text/plain"),
    (b"\xff\xfe", "application/json"),
])
def test_malformed_bodies_take_the_route_and_its_400(facade: InProcessFacade, stack: RunningStack,
                                                     ready_training: str, content: bytes, content_type: str) -> None:
    url = ROUTES[0].format(id=ready_training)
    handed_on = facade.counts.handed_on
    with facade.client() as client:
        answer = client.post(url, content=content, headers={"Content-Type": content_type})
    with stack.client() as client:  # the stack's own facade (another process) answers the same
        reference = client.post(url, content=content, headers={"Content-Type": content_type})
    assert facade.counts.handed_on == handed_on + 1
    assert answer.status_code == 400 and answer.json()["status"] == "error"
    assert answer.content == reference.content and answer.status_code == reference.status_code


def test_a_large_body_takes_the_route(facade: InProcessFacade, ready_training: str) -> None:
    url = ROUTES[0].format(id=ready_training)
    handed_on = facade.counts.handed_on
    with facade.client() as client:
        answer = client.post(url, json={"key": ALICE, "padding": "x" * 40_000})
    assert facade.counts.handed_on == handed_on + 1
    assert answer.status_code == 200 and answer.json()["training_status"] == "model_ready"


def test_a_training_in_progress_and_its_cancel(facade: InProcessFacade, stack: RunningStack,
                                               photos: list[Path]) -> None:
    body = {**CREATE_EXAMPLES["lora_fine_tune"], "key": ALICE, "images": [data_uri(p) for p in photos],
            "base_model_id": "tiny", "max_train_steps": "3000", "webhook": None}
    with facade.client() as client:
        training_id = client.post("/api/v3/lora_fine_tune", json=body).json()["training_id"]
        url = ROUTES[0].format(id=training_id)
        queued = same_answer(facade, url, ALICE).json()
        stack.wait_until_done(training_id, ALICE, until={"training_started"})
        deadline = time.monotonic() + 10  # this facade's caches may hold the data-preparation answer for 1 s
        while slow(client, url, ALICE).json()["training_status"] != "training_started":
            assert time.monotonic() < deadline, "this facade never said training_started"
            time.sleep(0.2)
        running = same_answer(facade, url, ALICE).json()
        assert client.post(f"/api/v3/cancel_training/{training_id}", json={"key": ALICE}).status_code == 200
        cancelled = fast(client, url, ALICE).json()  # at once, though the cached answer said "running"
    assert queued["training_status"] in {"deploying_gpu", "training_started"}
    assert running["training_status"] == "training_started" and running["progress"]["total_steps"] == 3000
    assert cancelled["training_status"] == "cancelled" and cancelled["data"] == "training cancelled"
    assert same_answer(facade, url, ALICE).json()["training_status"] == "cancelled"


def test_a_deleted_training_is_404_at_once(facade: InProcessFacade, ready_training: str) -> None:
    url = ROUTES[0].format(id=ready_training)
    with facade.client() as client:
        assert fast(client, url, ALICE).status_code == 200  # cached now
        deleted = client.post(f"/api/v3/finetune/delete/{ready_training}", json={"key": ALICE})
        after = fast(client, url, ALICE)
    assert deleted.status_code == 200
    assert after.status_code == 404 and after.json()["messege"] == "Model id not found"


def test_a_delete_while_the_store_is_down_still_removes_the_files_later(
    facade: InProcessFacade, stack: RunningStack, photos: list[Path]
) -> None:
    """The facade cannot remove a finished model's files during an S3 outage: it answers that they are
    being removed, and the cleanup run (queued first) removes them (once forgotten, the id used to
    keep its files for good). The outage is the facade's only: its store refuses to delete."""
    from api.deps import get_store
    from flows.store import StorageUnavailable

    body = {**CREATE_EXAMPLES["sandbox"], "key": ALICE, "images": [data_uri(p) for p in photos]}
    with stack.client() as client:
        training_id = client.post("/api/sandbox/v3/fine_tune", json=body).json()["training_id"]
    status, _ = stack.wait_until_done(training_id, ALICE)
    assert status["training_status"] == "model_ready", status

    real = facade.app.state.store

    class Outage:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def delete_prefix(self, prefix: str) -> int:
            raise StorageUnavailable("S3 server unreachable or failing (test)")

    facade.app.dependency_overrides[get_store] = lambda: Outage()
    try:
        with facade.client() as client:
            deleted = client.post(f"/api/v3/finetune/delete/{training_id}", json={"key": ALICE})
    finally:
        facade.app.dependency_overrides.pop(get_store)
    assert deleted.status_code == 200 and deleted.json()["data"].endswith("its files are being removed"), deleted.text
    deadline = time.monotonic() + 120
    while stack.store.list(f"trainings/{training_id}/"):
        assert time.monotonic() < deadline, "the cleanup run never removed the files"
        time.sleep(0.5)
