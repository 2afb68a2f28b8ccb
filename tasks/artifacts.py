"""What a person sees in the Prefect UI for a finished training: summary, samples, loss curve."""

from __future__ import annotations

from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.context import FlowRunContext, TaskRunContext

from flows.records import Manifest
from flows.store import ObjectStore

UI_LINK_EXPIRY_S = 7 * 24 * 3600  # the longest a presigned S3 link may live


def in_run() -> bool:
    """True inside a Prefect flow or task run (artifacts need one)."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def artifact_key(training_id: str, what: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return f"{training_id.lower()}-{what}"


def summary_markdown(manifest: Manifest, links: dict[str, str]) -> str:
    rows = "\n".join(f"| {name} | {f.size:,} bytes | `{f.sha256[:12]}` | [download]({links[name]}) |"
                     for name, f in manifest.files.items())
    images = "\n".join(f"![{name}]({url})" for name, url in links.items() if name in ("grid", "loss_curve"))
    return (
        f"# Model {manifest.training_id}\n\n"
        f"- method **{manifest.method}** on **{manifest.base_model_id}** ({manifest.family})\n"
        f"- instance prompt: `{manifest.instance_prompt}`\n"
        f"- {manifest.steps} steps, final loss {manifest.final_loss:.4f}\n\n"
        f"| file | size | sha256 | link (7 days) |\n| --- | --- | --- | --- |\n{rows}\n\n{images}\n"
    )


def publish_model_artifacts(manifest: Manifest, store: ObjectStore) -> None:
    """A markdown summary plus the sample grid and loss curve as image artifacts of the run."""
    if not in_run():
        return
    links = {name: store.link(f.key, UI_LINK_EXPIRY_S) for name, f in manifest.files.items()}
    for picture in manifest.samples:
        name = picture.key.rsplit("/", 1)[-1].removesuffix(".png")
        if name in ("grid", "loss_curve"):
            links[name] = store.link(picture.key, UI_LINK_EXPIRY_S)
            create_image_artifact(image_url=links[name], key=artifact_key(manifest.training_id, name.replace("_", "-")),
                                  description=f"{name.replace('_', ' ')} of {manifest.training_id}")
    create_markdown_artifact(summary_markdown(manifest, links), key=artifact_key(manifest.training_id, "summary"),
                             description=f"model {manifest.training_id}")
