"""What every op module shares to register its ops with ``torch.library`` and launch its Triton kernels.

Each op exists once per compiled backend with one schema: ``fastgrpo::<op>`` (C++ CPU and CUDA kernels,
``csrc/``) and ``fastgrpo::triton_<op>`` (Triton, registered from Python by the op's module). The op module
registers both the same way (``register_fake``/``register_autograd`` under a name prefix) and hands its host
code an :class:`Ops` bundle of one backend's callables.

Float hyper-parameters are fp32 tensors on the inputs' device, never ``float`` arguments: torch.compile
specializes a float argument of an op (a SymFloat included), so every new clip bound or temperature would
recompile. ``params_tensor`` builds them without a host sync. Int ``codes`` select variants: a recompile for a
new variant is expected. Their names and order: ``kernels/params.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union, cast

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------ Triton
# Under the Triton interpreter (CI, no GPU) the kernels are plain Python functions that ``triton_op``'s tracing
# would run on fake tensors, so there the launchers are registered as opaque ``custom_op``s, which launch the
# kernels directly (torch 2.6's ``wrap_triton`` rejects an interpreted kernel; it is only needed for tracing).
# ``triton_op`` lets ``torch.compile(fullgraph=True)`` see through the launchers on a GPU.


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def register_triton_op(name: str, launcher: Callable, mutates_args: Sequence[str] = ()) -> Callable:
    """Registers ``launcher`` (schema from its annotations) as the op ``fastgrpo::triton_<name>``."""
    from torch.library import custom_op, triton_op

    register = custom_op if _interpret() else triton_op
    return register(f"fastgrpo::triton_{name}", launcher, mutates_args=tuple(mutates_args))


def launch(kernel: Any) -> Any:
    """``kernel`` as a launcher calls it: wrapped for tracing on a GPU, as is under the interpreter."""
    if _interpret():
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def row_programs(logits: Tensor, rows: int, reread: bool) -> int:
    """Programs of a persistent row kernel over ``rows`` rows of ``logits``: see :func:`programs_for`."""
    return programs_for(logits.device, rows, logits.shape[-1] * logits.element_size(), reread)


def programs_for(device: torch.device, rows: int, row_bytes: int, reread: bool) -> int:
    """A kernel that reads each row twice (``reread``: the fused loss with its gradient) keeps its rows in flight
    within half of the device's L2 (kernels/token_logprobs.py: row_programs); one that reads each row once gets a
    program per row. The interpreter always takes the bound, with a small nominal L2, so that the tests run the
    persistent loop."""
    from .kernels import token_logprobs as K

    if device.type != "cuda":
        return K.row_programs(rows, row_bytes, K.INTERPRETER_L2_BYTES)
    if not reread:
        return max(rows, 1)
    return K.row_programs(rows, row_bytes, torch.cuda.get_device_properties(device).L2_cache_size)


def row_addressing(x: Tensor) -> tuple[int, int, int]:
    """(T, stride_b, stride_t): row r of a [B, T, V] / [N, V] tensor lives at (r // T)·stride_b + (r % T)·stride_t."""
    if x.dim() == 3:
        return x.shape[1], x.stride(0), x.stride(1)
    return 1, x.stride(0), 0


def rows(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A per-row tensor as a dense 1-D buffer: the kernels index it by row, and autograd hands in expanded
    (stride-0) gradients."""
    return x.reshape(-1).to(dtype or x.dtype).contiguous()


def float_params(x: Tensor, like: Tensor, numel: int, name: str) -> Tensor:
    """A float hyper-parameter tensor as the kernels read it: dense fp32 on the device of the op's inputs ``like``
    (the kernel loads it: a short or misplaced buffer would be read out of bounds)."""
    if x.numel() != numel or x.device != like.device:
        raise ValueError(
            f"{name} must hold {numel} value(s) on the device of the op's inputs ({like.device}), got "
            f"{x.numel()} on {x.device}"
        )
    return rows(x, torch.float32)


def check_codes(codes: Sequence[int], count: int) -> None:
    if len(codes) != count:
        raise ValueError(f"codes must hold {count} ints (kernels/params.py), got {len(codes)}")


# ------------------------------------------------------------------------------------------ the op bundle
@dataclass(frozen=True)
class Ops:
    """One compiled backend's ops (``torch.ops.fastgrpo.<op>`` or ``.triton_<op>``), by op name."""

    token_logprobs: Callable[..., Any]
    token_logprobs_backward: Callable[..., Any]
    grpo_loss_fused: Callable[..., Any]
    grpo_loss_fused_inplace_: Callable[..., Any]
    scale_grad_: Callable[..., Any]
    advantages: Callable[..., Any]

    @classmethod
    def of(cls, prefix: str) -> "Ops":
        """The ops registered as ``fastgrpo::<prefix><op>``."""
        namespace = torch.ops.fastgrpo
        return cls(**{name: getattr(namespace, prefix + name) for name in cls.__dataclass_fields__})


def accumulate(x: Tensor) -> Tensor:
    """``x`` in the accumulation dtype of the O(N) layer: fp32, or fp64 for fp64 inputs (gradcheck runs on them)."""
    return x if x.dtype == torch.float64 else x.float()


def params_tensor(values: Sequence[float], device: torch.device) -> Tensor:
    """``values`` as the fp32 tensor on ``device`` that the ops take for their float hyper-parameters, with no host
    sync: on CUDA staged in pinned memory and copied asynchronously (a pageable source makes the copy wait for
    it); on the host a plain tensor. While compiling, the values may be symbolic floats (Dynamo makes a config
    float that changed between calls a SymFloat): ``torch.tensor``/``torch.full`` of a SymFloat specialize it
    again (a recompile per value), while a tensor op taking it as a scalar operand keeps it a graph input."""
    if torch.compiler.is_compiling():
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack([(zero + v).to(torch.float32) for v in values])
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a captured CUDA graph would replay the copy from a pinned buffer freed (and reused) after capture:
        # fills on the device instead, with the values baked into the graph (as float arguments were)
        return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])
    if device.type == "cuda":
        return torch.tensor(values, dtype=torch.float32, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.float32, device=device)


def params_of(names: Sequence[str], values: Mapping[str, Union[float, Tensor]], device: torch.device) -> Tensor:
    """An op's fp32 ``params`` with its entries in the order of ``names`` (kernels/params.py), by name. An entry may
    be a 1-element device tensor (the batch std), spliced in without a host read."""
    # not isinstance(value, float): under torch.compile a config float may be a SymFloat, which params_tensor keeps
    floats = [0.0 if isinstance(value, Tensor) else cast(float, value) for value in (values[n] for n in names)]
    out = params_tensor(floats, device)
    for i, name in enumerate(names):
        value = values[name]
        if isinstance(value, Tensor):
            out = torch.cat([out[:i], value.reshape(1).to(out), out[i + 1 :]])
    return out


def op_arguments(op: Any) -> tuple[str, ...]:
    """The argument names of a registered op, in schema order."""
    return tuple(arg.name for arg in op.default._schema.arguments)


def gradients_by_name(op: Any, **grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """An autograd backward's return value for ``op``: the given gradients by argument name, None elsewhere."""
    names = op_arguments(op)
    unknown = set(grads) - set(names)
    assert not unknown, f"{unknown} are not arguments of {names}"
    return tuple(grads.get(name) for name in names)


# -------------------------------------------------------------------------------------------- autograd
def traced(x: Tensor) -> bool:
    """Under torch.compile / AOT tracing tensors are functional or fake: mutating a saved forward output is
    not expressible there."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor))


def precomputed_gradients(
    ctx, grad_loss: Tensor, scale_: Callable[[Tensor, Tensor], None], what: str
) -> list[Optional[Tensor]]:
    """``ctx.grads`` (gradients of a scalar loss computed in its forward) times ``grad_loss``.

    A backward that frees the graph (the usual one) scales the buffers in place and hands them over: autograd
    adopts a buffer nobody else holds as ``.grad`` without a copy. A backward that keeps the graph
    (``retain_graph=True``) returns scaled copies and keeps the buffers for the next one; that is what a
    retained graph costs: its gradient buffers stay alive with it, and each such backward writes one more copy.
    AOTAutograd asks the engine the same question (``_get_current_graph_task_keep_graph``, present in every
    supported torch). Traced by torch.compile, the buffers are saved activations: scaled out of place, with the
    scale op's rounding (fp32 product)."""
    if torch.compiler.is_compiling():
        return [None if g is None else (g.float() * grad_loss).to(g.dtype) for g in ctx.grads]
    first_order_only()
    grads = ctx.grads
    if grads is None:
        raise RuntimeError(
            f"Trying to backward through the {what} graph a second time: its gradient buffers were handed to the "
            "first backward. Specify retain_graph=True on every backward but the last."
        )
    if torch._C._autograd._get_current_graph_task_keep_graph():
        grads = [None if g is None else g.clone() for g in grads]
    else:
        ctx.grads = None
    for g in grads:
        if g is not None:
            scale_(g, grad_loss)
    return grads


def first_order_only() -> None:
    """The kernels' gradients are not differentiable: under ``create_graph=True`` (the only way grad mode is on
    inside an eager backward) they would silently count as constants in a higher-order gradient, so refuse."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "create_graph=True: fastgrpo's kernel backends compute first-order gradients only; "
            "use backend='reference' to differentiate a gradient"
        )
