"""Schemathesis over the facade's OpenAPI document, sent to the running facade (real stack, real HTTP).

The document is built from the code at collection time (schemathesis' lazy ``from_fixture`` loader
does not work with this pytest), and the first test checks that the running facade serves exactly
that document at ``/openapi.json``.

Every operation gets generated requests, valid and invalid by its schema (examples, coverage and
fuzzing phases), authenticated with a real API key (``Authorization: Bearer``, and in the body when
the body has a string ``key``). Checks: no 5xx, every status code declared, content type, body and
headers as declared, 405 for undeclared methods. Two checks are off because the schema is, by the
vendor contract, not the whole truth about inputs: ``positive_data_acceptance`` (a body can match
the schema and still be refused with 400: an unknown base model, an image that is not http(s) or a
decodable data: URI) and ``negative_data_rejection`` (SPEC §2 accepts numbers and booleans as
strings and ``""``/``"null"`` for "not given", which the schema does not list).

Generation is seeded and derandomized, so a run makes the same requests every time. The work pool
is paused meanwhile; any training a generated body happened to create stays queued and is
cancelled in Prefect afterwards, and their number is checked against the 201s the facade gave.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api.app import create_app
from flows.settings import Settings
from runguard import active_trainings, pool_paused
from stackserver import KEYS, RunningStack

MAX_EXAMPLES = int(os.environ.get("DREAMFLOW_FUZZ_EXAMPLES", "15"))
SEED = 20240611
CONFIG = {
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    # The coverage phase's positive variants of a create body are valid trainings (each a flow run,
    # the slowest request there is); its negative variants are what finds bugs.
    "phases": {"coverage": {"generation": {"mode": "negative"}}},
    "checks": {"positive_data_acceptance": {"enabled": False}, "negative_data_rejection": {"enabled": False}},
    "request-timeout": 30,
}

SEEN: dict[str, Counter] = defaultdict(Counter)  # operation -> status code -> count
SECONDS: dict[str, float] = defaultdict(float)  # operation -> time spent in requests
CREATED: set[str] = set()  # a replayed Idempotency-Key answers 201 with the first id again
FIGURES = Path(os.environ.get("DREAMFLOW_FUZZ_FIGURES", "")) if os.environ.get("DREAMFLOW_FUZZ_FIGURES") else None


@pytest.fixture(scope="module")
def paused_stack(stack: RunningStack) -> Iterator[RunningStack]:
    """The stack with its pool paused; trainings the fuzzer created are checked and cancelled after."""
    with pool_paused(stack) as before:
        count_before = stack.flow_run_count()
        yield stack
        made = {run["name"] for run in active_trainings(stack) if run["id"] not in before}
        if FIGURES is not None:
            FIGURES.write_text(json.dumps({
                "max_examples": MAX_EXAMPLES, "seed": SEED, "created": len(made),
                "operations": {op: {"requests": sum(codes.values()), "seconds": round(SECONDS[op], 1),
                                    "status_codes": dict(sorted(codes.items()))} for op, codes in sorted(SEEN.items())},
            }, indent=2))
        assert made <= CREATED, f"flow runs without a 201: {made - CREATED}"
        assert all(stack.flow_run(training_id) for training_id in CREATED)  # 201s without a flow run raise
        assert stack.flow_run_count() - count_before == len(made)


def facade_openapi() -> dict:
    """The facade's OpenAPI document, built from the code without starting anything."""
    return create_app(Settings(api_keys="unused")).openapi()


schema = schemathesis.openapi.from_dict(facade_openapi(), config=schemathesis.Config.from_dict(CONFIG))


def test_the_running_facade_serves_the_fuzzed_schema(stack: RunningStack) -> None:
    with stack.client() as client:
        assert client.get("/openapi.json").json() == facade_openapi()


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_every_operation_answers_as_declared(case: schemathesis.Case, paused_stack: RunningStack) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("key"), str | None):
        case.body["key"] = KEYS[0]  # a generated key would only ever get 401 (a form sends None as text)
    began = time.monotonic()
    response = case.call_and_validate(base_url=paused_stack.base_url, headers={"Authorization": f"Bearer {KEYS[0]}"})
    SECONDS[case.operation.label] += time.monotonic() - began
    SEEN[case.operation.label][response.status_code] += 1
    if response.status_code == 201:
        CREATED.add(json.loads(response.content)["training_id"])
