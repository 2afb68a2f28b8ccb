"""The Prefect UI's views of a training (tasks/artifacts.py) against the stack's real Prefect
server: inside a flow's ``artifacts_in_background`` the work that publishes them goes on at once,
and the run ends with every one created."""

from __future__ import annotations

import time
import uuid

import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from sqlitelock import write_while_holding_the_lock
from stackserver import RunningStack, prefect_request

from tasks.artifacts import artifacts_in_background, publish_artifacts

HOLD_S = 1.5  # the server's database is locked this long while the artifacts are published


@pytest.mark.parametrize("wait", [False, True], ids=["goes-on", "waits-when-asked"])
def test_a_run_goes_on_while_its_artifacts_are_created_and_ends_with_all_of_them(
    stack: RunningStack, wait: bool
) -> None:
    training_id = f"bg-{uuid.uuid4().hex[:8]}"
    seconds: dict[str, float] = {}

    @flow(name="dreamflow-artifacts-test")
    def publishing() -> None:
        started = time.monotonic()
        with artifacts_in_background():
            # The database is busy: creating an artifact waits for it.
            committer = write_while_holding_the_lock(
                stack, "UPDATE concurrency_limit_v2 SET updated = updated WHERE 0", (), HOLD_S)
            publish_artifacts(training_id, "crop-report", "# report", "kept and dropped training images",
                              {"contact-sheet": "http://127.0.0.1/contact_sheet.png"}, wait=wait)
            seconds["publish"] = time.monotonic() - started
        seconds["run"] = time.monotonic() - started
        committer.join()

    with temporary_settings({PREFECT_API_URL: stack.settings.prefect_api}):
        state = publishing(return_state=True)
    assert state.is_completed(), state
    if wait:  # the crop report: created before the training asks for its GPU slot
        assert seconds["publish"] >= HOLD_S - 0.2, seconds
    else:
        assert seconds["publish"] < 0.5, seconds  # the run went on at once...
    assert seconds["run"] >= HOLD_S - 0.2, seconds  # ...and its end waited for the artifacts
    artifacts = prefect_request("POST", f"{stack.settings.prefect_api}/artifacts/filter", {
        "artifacts": {"flow_run_id": {"any_": [str(state.state_details.flow_run_id)]}}}).json()
    assert {a["key"] for a in artifacts} == {f"crop-report-{training_id}", f"contact-sheet-{training_id}"}
