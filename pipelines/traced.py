"""TorchScript traces of small UNets on the CPU: the same aten ops, bit for bit, without Python between them.

Why (issue 12, measured on the embedded model, 2-core VM, one torch thread, batch of 2):
- an eager UNet forward took 17.6 ms, the traced one 11.5 ms: the tiny model is dispatch-bound, and the
  trace skips the Python of ~40 nn.Modules per call;
- an eager forward gives the GIL back and takes it again around every op, so any other busy Python thread
  (the web server streaming previews to the browser) slows it: with a pure-Python spinner beside it an eager
  call took 2.3 s, the traced call 20 ms. A traced forward releases the GIL once, for the whole call.

A trace records one path through `forward` for one input signature, so there is one trace per (shape, dtype)
of the inputs, made on first use; only for UNets whose forward takes nothing but (sample, timestep,
encoder_hidden_states) (no added conditioning, no guidance embedding); and never across a change of attention
processors (PAG swaps them for a run: generate() then calls the eager model, and a trace made before is
thrown away if the processors it recorded are no longer installed). The graph executor's optimizations are off
(`torch.jit.optimized_execution(False)`, which is thread-local): the profiling executor took 184 and 106 ms
on its first two calls and may fuse ops, which could change numerics. Large models are compute-bound and
gain nothing worth a trace, so they run eagerly.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

# Denoisers below this many parameters count as small on a CPU: traced, and run on one torch thread
# (pipelines/worker.py). The embedded UNet has ~3.2 M; SD 1.5's has 860 M.
SMALL_DENOISER_PARAMS = 50_000_000


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def traceable(unet: object) -> bool:
    """Whether `unet` is a CPU UNet whose forward needs only (sample, timestep, encoder_hidden_states). Whether it
    is small enough to be worth a trace is the loader's count (ModelLoader.small_denoiser), made once per model."""
    if not isinstance(unet, UNet2DConditionModel) or unet.device.type != "cpu":
        return False
    config = unet.config
    return all(config.get(k) is None for k in ("time_cond_proj_dim", "addition_embed_type", "class_embed_type",
                                               "encoder_hid_dim_type"))


class _Forward(torch.nn.Module):
    """The call generate() makes, as a module with tensor arguments only (what torch.jit.trace records)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def _signature(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class TracedUNet:
    """`unet(sample, t, encoder_hidden_states=...)` through per-signature traces; same output as the eager call.

    Holds the traces (which share the UNet's parameter tensors) and the UNet's attention modules, never the UNet
    itself, so a loader can key these by the UNet in a WeakKeyDictionary and forget them with the model.
    """

    def __init__(self, unet: UNet2DConditionModel, max_traces: int = 8) -> None:
        self.max_traces = max_traces
        self.traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
        self._attention = [m for m in unet.modules() if isinstance(m, Attention)]
        self._processors = self._installed()

    def _installed(self) -> tuple[int, ...]:
        return tuple(id(m.processor) for m in self._attention)

    def is_current(self) -> bool:
        """True when the attention processors are those the traces recorded; else drops the traces and re-arms
        for the processors installed now (the caller, mid-PAG, then runs eagerly: see generate())."""
        installed = self._installed()
        if installed == self._processors:
            return True
        self.traces.clear()
        self._processors = installed
        return False

    def __call__(self, unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        key = _signature(sample, timestep, encoder_hidden_states)
        with torch.no_grad(), torch.jit.optimized_execution(False):
            trace = self.traces.get(key)
            if trace is None:
                with warnings.catch_warnings():  # its TracerWarnings are the shape checks the signature key covers
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    trace = torch.jit.trace(_Forward(unet), (sample, timestep, encoder_hidden_states), check_trace=False)
                self.traces[key] = trace
                while len(self.traces) > self.max_traces:
                    self.traces.popitem(last=False)
            else:
                self.traces.move_to_end(key)
            return trace(sample, timestep, encoder_hidden_states)
