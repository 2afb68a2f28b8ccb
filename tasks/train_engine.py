"""The training loop for every method: `train(config, images, captions, output_dir, ...)`.

The algorithm is that of diffusers' `examples/dreambooth/train_dreambooth{,_lora,_lora_sdxl}.py`:
noise-prediction MSE on cached VAE latents (optionally min-SNR weighted, with offset noise),
plus `prior_loss_weight` x the same loss on class images when prior preservation is on. Only
the adapter (lora/loha/lokr) or the whole UNet (dreambooth, and the text encoder for its first
`text_encoder_steps`) trains. Under `accelerate launch` each process trains on its own batches
and gradients are averaged; only the main process saves checkpoints and weights.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.store import StorageError
from tasks.adapters import save_adapter
from tasks.checkpoints import (
    Checkpoint,
    CheckpointStore,
    capture_rng,
    inputs_digest,
    load_latest,
    restore_rng,
    save_checkpoint,
)
from tasks.engine_config import (
    ADAPTER_METHODS,
    ProgressCallback,
    ProgressEvent,
    StopCheck,
    TrainConfig,
    TrainingCancelled,
    TrainResult,
    check_finite,
)
from tasks.engine_loss import compute_loss
from tasks.engine_setup import Prepared, Session, named_trainable, start_session

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def train(
    config: TrainConfig,
    images: Sequence[Path],
    captions: Sequence[str],
    output_dir: Path,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    checkpoints: CheckpointStore | None = None,
    class_images: Sequence[Path] | None = None,
    keep_trained: Callable[[Any], None] | None = None,
    prepared: Prepared | None = None,
) -> TrainResult:
    """Train on `images` (one caption each), save the result into `output_dir`, and describe it.

    With `checkpoints`, a checkpoint goes to the store every `config.checkpoint_every` steps and
    a run that finds one there resumes from it. With `class_images`, prior preservation is on.
    With `keep_trained`, an adapter training run in one process hands it its trained UNet (frozen,
    in eval mode, adapter unmerged) once the weights are saved, instead of dropping it. With
    `prepared` (engine_setup.prepare_session for this config and these images), the part of the
    setup that needs no device is already done.
    """
    if len(images) == 0 or len(images) != len(captions):
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    if class_images and not config.class_prompt:
        raise ValueError("class images need config.class_prompt")
    started = time.perf_counter()
    phases = _Phases()
    session = start_session(config, images, captions, class_images, prepared)
    try:
        if checkpoints is not None:
            checkpoints = replace(checkpoints, inputs=run_inputs(config, images, captions))
        start_step, losses = _resume(session, checkpoints)
        phases.mark("setup")
        losses = _run_loop(session, config, start_step, losses, on_progress, should_stop, checkpoints)
        phases.mark("loop")
        adapter_file, pipeline_dir = _save_result(session, config, Path(output_dir))
        phases.mark("save")
        if keep_trained is not None:
            _hand_over(session, config, keep_trained)
    finally:
        _free(session)
    phases.mark("free")
    adapter = config.method in ADAPTER_METHODS
    return TrainResult(
        method=config.method,
        family=config.family,
        adapter_file=adapter_file,
        pipeline_dir=pipeline_dir,
        rank=config.rank if adapter else 0,
        alpha=float(config.alpha) if adapter else 0.0,
        steps=config.max_train_steps,
        resumed_from=start_step,
        final_loss=losses[-1][1],
        losses=losses,
        seconds=time.perf_counter() - started,
        phases=phases.seconds,
    )


class _Phases:
    """Wall seconds of consecutive parts of a run, each from the previous mark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


# Settings that change how a run goes, not what it learns: a rerun may differ in them and resume.
OPERATIONAL_FIELDS = frozenset({"report_every", "checkpoint_every", "compile_unet", "cuda_graphs",
                                "gradient_checkpointing"})


def run_inputs(config: TrainConfig, images: Sequence[Path], captions: Sequence[str]) -> str:
    """What a checkpoint must have been made from for this run to resume from it."""
    return inputs_digest(config.model_dump_json(exclude=set(OPERATIONAL_FIELDS)), images, captions)


def _resume(session: Session, checkpoints: CheckpointStore | None) -> tuple[int, list[tuple[int, float]]]:
    """Load the latest checkpoint into the session; (step it reached, its loss history). A checkpoint
    made from other images, captions or settings (an earlier attempt under the same training id)
    is left alone: the run starts over, and its own first checkpoint replaces it."""
    import torch

    checkpoint = load_latest(checkpoints) if checkpoints is not None else None
    if checkpoint is None:
        return 0, []
    if checkpoint.inputs != checkpoints.inputs:
        logger.warning("the checkpoint at step %d was made from other images or settings: starting over",
                       checkpoint.step)
        return 0, []
    named = named_trainable(session)
    if set(named) != set(checkpoint.trainable):
        raise ValueError(f"checkpoint at {checkpoints.prefix} does not match this run's trainable weights")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(checkpoint.trainable[name].to(param.device, param.dtype))
    if session.master is not None:
        session.master.publish()
    session.optimizer.load_state_dict(checkpoint.optimizer)
    session.lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
    restore_rng(checkpoint.rng, session.generator)
    logger.info("resumed from the checkpoint at step %d", checkpoint.step)
    return checkpoint.step, list(checkpoint.losses)


def _run_loop(
    session: Session,
    config: TrainConfig,
    start_step: int,
    losses: list[tuple[int, float]],
    on_progress: ProgressCallback | None,
    should_stop: StopCheck | None,
    checkpoints: CheckpointStore | None,
) -> list[tuple[int, float]]:
    import torch

    total = config.max_train_steps
    window = torch.zeros((), device=session.accelerator.device)
    window_steps, loop_started = 0, time.perf_counter()
    graphed = _GraphedStep(session, config) if session.cuda_graphs else None
    for step in range(start_step + 1, total + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled at step {step - 1} of {total}")
        _freeze_text_encoder_when_done(session, config, step)
        loss = graphed(step) if graphed is not None else _optimisation_step(session, config, step)
        window += loss.detach().float()
        window_steps += 1
        if step % config.report_every == 0 or step == total:
            rate = (step - start_step) / max(time.perf_counter() - loop_started, 1e-9)
            losses.append((step, _report(float((window / window_steps).item()), step, total, rate, on_progress)))
            window.zero_()
            window_steps = 0
        if checkpoints is not None and config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
            _checkpoint(session, checkpoints, step, losses)
    if session.master is not None:  # fp32 weights back in the UNet, to save and sample with
        session.master.restore()
    if graphed is not None:
        graphed.close()
    return losses


class _GraphedStep:
    """The optimisation step as one CUDA graph: a few eager steps, one capture, then a replay per step.

    Eagerly, an SD 1.5 LoRA step launches ~5,000 small kernels and the GPU waits on Python between
    them (130 ms/step on an H100); a replay launches them all at once (25 ms; 21 ms with the master
    weights a bf16 adapter run then uses). The graph owns the gradients (or writes into those of the
    master weights) and the loss it computes, and each replay overwrites them; the learning rate is a
    device tensor that the scheduler fills between replays, and the loop's generator is registered
    with the graph so that every replay draws new batches, noise and timesteps.
    """

    EAGER_STEPS = 3  # lazy initialisation (optimizer state, cuBLAS/cuDNN handles) happens before the capture

    def __init__(self, session: Session, config: TrainConfig) -> None:
        import torch

        self.session, self.config = session, config
        self.eager_left = self.EAGER_STEPS
        self.eager_only = False  # the capture failed: the run goes on eagerly
        self.graph: Any = None
        self.loss: torch.Tensor | None = None
        self.side = torch.cuda.Stream()
        device = session.accelerator.device
        for group in session.optimizer.param_groups:  # floats would be baked into the graph
            group["initial_lr"] = float(group.get("initial_lr", group["lr"]))
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def __call__(self, step: int) -> torch.Tensor:
        import torch

        if self.eager_left:  # on a side stream, as CUDA graph capture asks of warm-up work
            self.eager_left -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = _optimisation_step(self.session, self.config, step)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        if self.graph is None and not self.eager_only:
            self._capture()
        if self.eager_only:
            return _optimisation_step(self.session, self.config, step)
        self.graph.replay()
        self.session.lr_scheduler.step()
        assert self.loss is not None
        return self.loss

    def _capture(self) -> None:
        import torch

        started = time.perf_counter()
        self._drop_gradients()  # the graph allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.session.generator)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks, free for the graph's own memory pool
        try:
            with torch.cuda.graph(graph):
                self.loss = _update(self.session, self.config)
        except Exception:  # a model or option that syncs with the host inside the step
            logger.warning("could not capture the training step as a CUDA graph; it runs eagerly", exc_info=True)
            self.eager_only = True
            self._drop_gradients()
            return
        self.graph = graph
        logger.info("training step captured as a CUDA graph in %.2f s", time.perf_counter() - started)

    def close(self) -> None:
        """Free the graph and the gradients in its memory; the UNet goes back to the usual layout to be saved."""
        import torch

        self.graph = self.loss = None
        self._drop_gradients()
        self.session.unet.to(memory_format=torch.contiguous_format)

    def _drop_gradients(self) -> None:
        """Free the gradients, unless master weights keep theirs in buffers of their own for good."""
        if self.session.master is None:
            self.session.optimizer.zero_grad(set_to_none=True)


def _report(value: float, step: int, total: int, rate: float, on_progress: ProgressCallback | None) -> float:
    check_finite(value, step, total)
    logger.debug("step %d/%d loss %.5f (%.2f steps/s)", step, total, value, rate)
    if on_progress is not None:
        on_progress(ProgressEvent(step=step, total=total, loss=value, steps_per_second=rate))
    return value


def _checkpoint(session: Session, target: CheckpointStore, step: int, losses: list[tuple[int, float]]) -> None:
    if not session.accelerator.is_main_process:
        return
    checkpoint = Checkpoint(
        step=step,
        trainable={name: param.detach().float() for name, param in named_trainable(session).items()},
        optimizer=_with_float_lr(session.optimizer.state_dict()),
        lr_scheduler=session.lr_scheduler.state_dict(),
        rng=capture_rng(session.generator),
        losses=list(losses),
    )
    try:
        logger.info("checkpoint at step %d -> %s", step, save_checkpoint(target, checkpoint))
    except StorageError as exc:  # an outage of the store must not end the training; the last one stands
        logger.warning("checkpoint at step %d not stored (%s); training goes on", step, exc)


def _with_float_lr(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state with plain-number learning rates (a CUDA graph's run keeps them as device tensors)."""
    for group in state["param_groups"]:
        group["lr"] = float(group["lr"])
    return state


def _freeze_text_encoder_when_done(session: Session, config: TrainConfig, step: int) -> None:
    """After `text_encoder_steps`, freeze the text encoder and re-cache embeddings with it, once."""
    import torch

    encoder = session.text_encoder
    if encoder is None or step <= config.text_encoder_steps or not encoder.training:
        return
    encoder.eval()
    encoder.requires_grad_(False)
    with torch.no_grad():
        for dataset in (session.instance, session.prior):
            if dataset is not None:
                dataset.embeddings = encoder(dataset.input_ids)[0].float()


def _optimisation_step(session: Session, config: TrainConfig, step: int) -> torch.Tensor:
    loss = _update(session, config)
    session.lr_scheduler.step()
    if session.master is None:  # master weights overwrite their gradients in place at the next step
        session.optimizer.zero_grad(set_to_none=True)
    return loss


def _update(session: Session, config: TrainConfig) -> torch.Tensor:
    """Forward and backward over the step's micro-batches, gradient clipping, the optimizer's update."""
    accelerator, master = session.accelerator, session.master
    total_loss = None
    for index in range(config.gradient_accumulation_steps):
        loss = compute_loss(session, config) / config.gradient_accumulation_steps
        if master is not None:
            master.start_backward()
        accelerator.backward(loss)
        if master is not None:
            master.take_gradients(first=index == 0)
        total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
    params = [p for group in session.optimizer.param_groups for p in group["params"] if p.grad is not None]
    accelerator.clip_grad_norm_(params, config.max_grad_norm)
    session.optimizer.step()
    if master is not None:
        master.publish()
    return total_loss


def _save_result(session: Session, config: TrainConfig, output_dir: Path) -> tuple[Path | None, Path | None]:
    """(adapter file, None) for adapters; (None, pipeline folder) for dreambooth."""
    accelerator = session.accelerator
    accelerator.wait_for_everyone()
    unet = accelerator.unwrap_model(session.unet)
    if config.method in ADAPTER_METHODS:
        path = save_adapter(unet, config.method, config.family, output_dir)
        return path, None
    pipeline_dir = output_dir / "pipeline"
    if accelerator.is_main_process:
        _save_pipeline(config, unet, session.text_encoder and accelerator.unwrap_model(session.text_encoder), pipeline_dir)
    return None, pipeline_dir


def _save_pipeline(config: TrainConfig, unet: Any, text_encoder: Any | None, dest: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    components: dict[str, Any] = {"unet": unet}
    if text_encoder is not None:
        components["text_encoder"] = text_encoder
    if config.family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(config.pretrained_path, **components)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(
            config.pretrained_path, safety_checker=None, requires_safety_checker=False, **components
        )
    pipe.save_pretrained(dest, safe_serialization=True)
    del pipe


def _hand_over(session: Session, config: TrainConfig, keep_trained: Callable[[Any], None]) -> None:
    """The trained UNet to `keep_trained`, ready to sample with, when one process trained an adapter."""
    if config.method not in ADAPTER_METHODS or session.accelerator.num_processes != 1:
        return
    unet = session.accelerator.unwrap_model(session.unet)
    unet = getattr(unet, "_orig_mod", unet)  # the module under torch.compile's wrapper
    unet.requires_grad_(False)
    unet.eval()
    keep_trained(unet)


def _free(session: Session) -> None:
    import torch

    session.accelerator.free_memory()
    session.unet = session.text_encoder = session.optimizer = session.lr_scheduler = None  # type: ignore[assignment]
    session.master = None
    session.instance = session.prior = None  # type: ignore[assignment]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
