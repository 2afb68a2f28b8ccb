"""A flow that does nothing, for tests of how workers pick runs up (loaded by its entrypoint)."""

from prefect import flow


@flow(name="dreamflow-noop")
def noop() -> str:
    return "done"
