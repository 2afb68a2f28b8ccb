"""bf16 adapter weights for the step to compute with, trained through fp32 master copies.

Under autocast, an adapter step on a bf16 UNet casts every fp32 adapter weight to bf16 for each
matrix product and every normalisation's input up to fp32 and back: about 1,500 of the SD 1.5
LoRA step's 5,000 kernels. Here the adapter weights themselves are bf16, so the step runs in bf16
without autocast (the kernels accumulate in fp32 as autocast's would), while the optimizer keeps
fp32 weights and state: the AdamW update, its small increments included, happens in fp32, and
the bf16 weights are a copy of the result. Captured as a CUDA graph on an H100, the step went from
25.05 to 21.0 ms (bench/results/gpu_step_variants.json, `bf16-master`).

The module's adapter parameters become views of one flat bf16 buffer and their gradients views of
another, so a step adds one flat copy in and one out however many adapter tensors there are. The
optimizer steps the masters, which are views of one flat fp32 buffer with the same names, shapes
and order as the module's parameters: checkpoints (weights and optimizer state) keep the format
of a run without master weights and resume in either kind of run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class MasterWeights:
    """Turns the trainable parameters of `module` into bf16 views and keeps their fp32 masters."""

    def __init__(self, module: torch.nn.Module) -> None:
        import torch

        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters to keep master weights of")
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device
        self.master = torch.empty(total, dtype=torch.float32, device=device)
        self.master_grad = torch.zeros_like(self.master)
        self.working = torch.empty(total, dtype=torch.bfloat16, device=device)
        self.working_grad = torch.zeros_like(self.working)
        self.masters: list[torch.nn.Parameter] = []
        offset = 0
        with torch.no_grad():
            for param in self.params:
                span = slice(offset, offset + param.numel())
                self.master[span].copy_(param.reshape(-1))
                master = torch.nn.Parameter(self.master[span].view_as(param))
                master.grad = self.master_grad[span].view_as(param)
                self.masters.append(master)
                param.data = self.working[span].view_as(param)
                param.grad = self.working_grad[span].view_as(param)
                offset += param.numel()
        self._by_param = {id(param): master for param, master in zip(self.params, self.masters, strict=True)}
        self.publish()

    def master_of(self, param: torch.Tensor) -> torch.nn.Parameter:
        """The fp32 master of one of the module's trainable parameters."""
        return self._by_param[id(param)]

    def start_backward(self) -> None:
        """Before a micro-batch's backward pass: autograd adds into the bf16 gradients."""
        self.working_grad.zero_()

    def take_gradients(self, first: bool) -> None:
        """After a micro-batch's backward pass: its gradients into the fp32 ones (summed over micro-batches)."""
        if first:
            self.master_grad.copy_(self.working_grad)
        else:
            self.master_grad.add_(self.working_grad)

    def publish(self) -> None:
        """After the optimizer's step (or a checkpoint's load into the masters): bf16 weights from them."""
        import torch

        with torch.no_grad():
            self.working.copy_(self.master)

    def restore(self) -> None:
        """Give the module fp32 copies of the masters back as its own weights (to save or sample with)."""
        import torch

        with torch.no_grad():
            for param, master in zip(self.params, self.masters, strict=True):
                param.data = master.detach().clone()
                param.grad = None
