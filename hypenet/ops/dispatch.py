"""Backend selection: a pure function of device, dtype, dims and the override, so it traces under torch.compile.

Every op lists, per backend, either None (it can run these inputs) or the reason it cannot. `auto` takes the
first usable backend in the order cuda > triton on GPUs; on the CPU it takes the reference (Triton's interpreter
runs there only when forced, for tests). Under a torch.func transform (outside torch.compile tracing) only the
reference can run.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("cuda", "triton", "reference")
BACKEND_ENV = "HYPENET_BACKEND"


def requested_backend(backend: Optional[str]) -> Optional[str]:
    """The `backend=` argument, else $HYPENET_BACKEND, else None (auto)."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        source = f"${BACKEND_ENV}"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    return backend


# The kernels read plain tensors' memory; torch.func wraps its inputs (grad: tracking wrappers, vmap: batched
# tensors), which only the references, written in torch ops, can take.
FUNCTORCH_REASON = ("under a torch.func transform (grad, vjp, vmap, ...) only the reference runs: the kernels take "
                    "plain tensors")


def _functorch_active() -> bool:
    # is_compiling() first: torch.compile traces the plain call, and short-circuits before the private query.
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def select_backend(op: str, backend: Optional[str], device: torch.device, reasons: dict[str, Optional[str]]) -> str:
    """Pick the backend for `op` on inputs living on `device`. `reasons[name]` is None when that backend can run
    the inputs; a requested backend that cannot raises with its reason. Under a torch.func transform only the
    reference can run."""
    if _functorch_active():
        reasons = {name: reason if name == "reference" else FUNCTORCH_REASON for name, reason in reasons.items()}
    wanted = requested_backend(backend)
    if wanted is not None:
        reason = reasons.get(wanted, f"{op} has no {wanted} backend")
        if reason is not None:
            raise ValueError(f"{op}: backend {wanted!r} cannot run these inputs: {reason}")
        return wanted
    if device.type == "cuda":
        for name in ("cuda", "triton"):
            if reasons.get(name, "absent") is None:
                return name
    return "reference"


def triton_device_reason(device: torch.device) -> Optional[str]:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"


KERNEL_MODULES = (
    "hypenet.ops.cuda_ext",
    "triton_ops.lightning.chunk",
    "triton_ops.lightning.step",
    "triton_ops.hype_attention.fwd",
    "triton_ops.hype_attention.bwd",
    "triton_ops.hype_attention.decode",
    "triton_ops.norm",
    "triton_ops.softmax_losses",
)


def _import(name: str) -> ModuleType | Exception:
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure means "backend unavailable, here is why"
        return err


# Imported once, up front: an import inside a traced call would break torch.compile(fullgraph=True).
_modules: dict[str, ModuleType | Exception] = {name: _import(name) for name in KERNEL_MODULES}


def load_kernel_module(name: str) -> ModuleType | Exception:
    """A kernel module of KERNEL_MODULES, or the exception its import raised (reported as the reason)."""
    return _modules[name]


def triton_kernel_reason(module_name: str, device: torch.device, *args) -> Optional[str]:
    """Why the Triton kernels of `module_name` cannot run `args` (None when they can)."""
    reason = triton_device_reason(device)
    if reason is not None:
        return reason
    module = load_kernel_module(module_name)
    if isinstance(module, Exception):
        return f"{module_name} could not be imported: {module}"
    return module.unsupported_reason(*args)


def cuda_kernel_reason(op: str, device: torch.device, *args) -> Optional[str]:
    """Why the compiled extension cannot run `op` on `args` here: CPU tensors, no extension, built without that
    kernel, or inputs outside what the kernel was instantiated for."""
    if device.type != "cuda":
        return f"CUDA kernels need CUDA tensors, got device {device}"
    module = load_kernel_module("hypenet.ops.cuda_ext")
    if isinstance(module, Exception):
        return f"hypenet.ops.cuda_ext could not be imported: {module}"
    return module.cuda_unsupported_reason(op, *args)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_traced(args: tuple) -> bool:
    """Whether torch.compile or another tracer is at work: a compiling frame, an active dispatch mode, or fake or
    functional tensor subclasses among the arguments."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSOR_TYPES for a in args)


def _records_autograd(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def kernel_op(qualname: str, impl: Callable, fake: Callable, *, mutates_args: tuple[str, ...] = (),
              setup_context: Optional[Callable] = None, backward: Optional[Callable] = None) -> Callable:
    """Register `impl` as the torch.library custom op `qualname` (torch.ops.<qualname>), with its fake (shapes for
    tracing) and, when given, its autograd. Returns the function the public ops call: the registered op while
    tracing; in eager mode `impl` itself, through a plain autograd.Function with the same setup_context and
    backward when autograd records the call. The registered op's autograd is such a Function behind the
    dispatcher; called directly it skips the dispatcher and schema plumbing (host time of a lightning_attn forward
    and backward with the kernels stubbed out, 2-core CPU: ~320-450 us through the registered op, ~190-205 us so)."""
    op = torch.library.custom_op(qualname, mutates_args=mutates_args)(impl)
    op.register_fake(fake)
    if backward is None:
        def call(*args):
            return op(*args) if _is_traced(args) else impl(*args)
        return call

    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):
        # The ctx-taking forward, as the registered op's own Function has: a separate setup_context staticmethod
        # would make every apply() bind the arguments through inspect.signature.
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    # The backwards are kernels without derivatives of their own: once_differentiable makes a double backward
    # (create_graph=True, e.g. a gradient penalty) raise instead of treating the gradients as constants.
    eager = type(f"{qualname.split('::')[-1]}_eager", (torch.autograd.Function,),
                 {"forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))})

    def call_differentiable(*args):
        if _is_traced(args):
            return op(*args)
        return eager.apply(*args) if _records_autograd(args) else impl(*args)

    return call_differentiable
