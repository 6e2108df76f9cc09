"""Backends: the implementations behind the public functions, and which one runs a call.

Every backend satisfies :class:`Backend`. ``reference`` runs the fp32 oracle (``fastgrpo.reference``);
``triton``, ``cpu`` (C++) and ``cuda`` are one :class:`KernelBackend` each, over that backend's compiled ops
(``_library.Ops``): kernels for every pass over the vocabulary, the op modules' host code for the rest.

``auto`` takes the first available backend in the device's preference order; naming a backend forces it and
fails clearly when it is not available. Backends are loaded (kernels imported, ops registered) on first use,
never at ``import fastgrpo``. Triton and CUDA run on CUDA tensors, ``cpu`` on CPU tensors; Triton also runs on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how CI
tests it. A backend whose compiled part is missing (no triton, extension not built) is skipped by ``auto`` with
a warning. ``auto`` never picks the CUDA backend: its kernels have not yet run on a GPU, so it runs only when
named (``backend="cuda"``).

A selection is resolved once per (backend, device type) and cached, so that under ``torch.compile`` a call
costs a dictionary lookup that Dynamo traces (and guards on) instead of an import. A first selection inside
a compiled region is traced too: backends are loaded by ``import`` statements, which Dynamo executes at trace
time.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Protocol

import torch
from torch import Tensor

from . import _library, reference
from .config import AdvantageConfig, LossOutput, Rewards
from .inputs import LMHead, LossInputs
from .reward import advantages as _advantages
from .trajectory import grpo_loss as _grpo_loss
from .trajectory import linear_grpo_loss as _linear_grpo_loss
from .trajectory import objective as _objective
from .trajectory import token_logprobs as _token_logprobs

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")


class Backend(Protocol):
    """What a backend implements: the public functions' work on validated inputs (``LossInputs``)."""

    name: str
    supports_inplace_grad: bool

    def token_logprobs(
        self, logits: Tensor, targets: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Optional[Tensor]]: ...

    def linear_token_logprobs(
        self, hidden: Tensor, head: LMHead, targets: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Optional[Tensor]]: ...

    def advantages(
        self, rewards: Rewards, config: AdvantageConfig = AdvantageConfig(), metrics: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def policy_loss(self, logprobs: Tensor, entropy: Optional[Tensor], inputs: LossInputs) -> LossOutput: ...

    def grpo_loss(
        self, logits: Tensor, targets: Tensor, inputs: LossInputs, return_entropy: bool, inplace_grad: bool
    ) -> LossOutput: ...

    def linear_grpo_loss(
        self,
        hidden: Tensor,
        head: LMHead,
        targets: Tensor,
        inputs: LossInputs,
        return_entropy: bool,
        chunk_tokens: Optional[int],
    ) -> LossOutput: ...


class ReferenceBackend:
    """``backend="reference"``: the oracle, called with its own keyword arguments."""

    name = "reference"
    supports_inplace_grad = False

    @staticmethod
    def _keywords(inputs: LossInputs) -> dict:
        return dict(
            old_logprobs=inputs.old_logprobs,
            ref_logprobs=inputs.ref_logprobs,
            sampling_logprobs=inputs.sampling_logprobs,
            teacher_logprobs=inputs.teacher_logprobs,
            is_weights=inputs.is_weights,
            cu_seqlens=inputs.cu_seqlens,
            normalizer=inputs.normalizer,
            config=inputs.config,
            generator=inputs.generator,
        )

    def token_logprobs(
        self, logits: Tensor, targets: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        return reference.token_logprobs(logits, targets, temperature, entropy)

    def linear_token_logprobs(
        self, hidden: Tensor, head: LMHead, targets: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        return reference.linear_token_logprobs(
            hidden, head.weight, targets, head.bias, temperature, entropy, head.logit_scale, head.logit_softcap
        )

    def advantages(
        self, rewards: Rewards, config: AdvantageConfig = AdvantageConfig(), metrics: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return reference.advantages(
            rewards.rewards, rewards.group_size, rewards.group_ids, config, rewards.weights, metrics
        )

    def policy_loss(self, logprobs: Tensor, entropy: Optional[Tensor], inputs: LossInputs) -> LossOutput:
        return reference.policy_loss(
            logprobs, inputs.advantages, inputs.mask, entropy=entropy, **self._keywords(inputs)
        )

    def grpo_loss(
        self, logits: Tensor, targets: Tensor, inputs: LossInputs, return_entropy: bool, inplace_grad: bool
    ) -> LossOutput:
        return reference.grpo_loss(
            logits, targets, inputs.advantages, inputs.mask, return_entropy=return_entropy, **self._keywords(inputs)
        )

    def linear_grpo_loss(
        self,
        hidden: Tensor,
        head: LMHead,
        targets: Tensor,
        inputs: LossInputs,
        return_entropy: bool,
        chunk_tokens: Optional[int],
    ) -> LossOutput:
        return reference.linear_grpo_loss(
            hidden,
            head.weight,
            targets,
            inputs.advantages,
            inputs.mask,
            bias=head.bias,
            return_entropy=return_entropy,
            logit_scale=head.logit_scale,
            logit_softcap=head.logit_softcap,
            **self._keywords(inputs),
        )

    def __repr__(self) -> str:
        return "ReferenceBackend()"


def require_kernels(impl: "Backend", argument: str) -> "KernelBackend":
    """The kernel backend running a distributed call: the shards' statistics come from the kernels."""
    if not isinstance(impl, KernelBackend):
        raise ValueError(f"{argument} needs a kernel backend (cpu, triton or cuda), got backend={impl.name!r}")
    return impl


class KernelBackend:
    """A compiled backend (Triton, C++ CPU, CUDA): its ops, run by each op module's host code."""

    supports_inplace_grad = True

    def __init__(self, name: str, ops: _library.Ops) -> None:
        self.name, self.ops = name, ops

    def token_logprobs(
        self, logits: Tensor, targets: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        lp, ent, _ = _token_logprobs.kernel_token_logprobs(self.ops, logits, targets, temperature, entropy)
        return lp, ent

    def linear_token_logprobs(
        self, hidden: Tensor, head: LMHead, targets: Tensor, temperature: float, entropy: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        return _linear_grpo_loss.kernel_linear_token_logprobs(self.ops, hidden, head, targets, temperature, entropy)

    def advantages(
        self, rewards: Rewards, config: AdvantageConfig = AdvantageConfig(), metrics: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return _advantages.kernel_advantages(self.ops, rewards, config, metrics)

    def policy_loss(self, logprobs: Tensor, entropy: Optional[Tensor], inputs: LossInputs) -> LossOutput:
        # O(N) on given log-probs: no vocabulary pass to fuse
        return _objective.policy_loss(logprobs, inputs, entropy)

    def grpo_loss(
        self, logits: Tensor, targets: Tensor, inputs: LossInputs, return_entropy: bool, inplace_grad: bool
    ) -> LossOutput:
        return _grpo_loss.kernel_grpo_loss(self.ops, logits, targets, inputs, return_entropy, inplace_grad)

    def linear_grpo_loss(
        self,
        hidden: Tensor,
        head: LMHead,
        targets: Tensor,
        inputs: LossInputs,
        return_entropy: bool,
        chunk_tokens: Optional[int],
    ) -> LossOutput:
        return _linear_grpo_loss.kernel_linear_grpo_loss(
            self.ops, hidden, head, targets, inputs, return_entropy, chunk_tokens
        )

    def __repr__(self) -> str:
        return f"KernelBackend({self.name!r})"


# ------------------------------------------------------------------------------------------------ loading
OP_MODULES = (_token_logprobs, _grpo_loss, _advantages)  # each registers its ops: register(prefix, ops)
CUDA_UNAVAILABLE: Optional[str] = None  # why the CUDA kernels of the extension cannot load, if they cannot


def _register(prefix: str) -> _library.Ops:
    ops = _library.Ops.of(prefix)
    _token_logprobs.register(prefix, ops)
    _grpo_loss.register(prefix, ops)
    _advantages.register(prefix)
    return ops


def _load_triton() -> KernelBackend:
    import triton  # noqa: F401  (ImportError: not installed, e.g. macOS, Windows)

    for module in OP_MODULES:
        module.register_triton()
    return KernelBackend("triton", _register("triton_"))


def _load_extension() -> dict[str, Optional[KernelBackend]]:
    """Importing ``fastgrpo._C`` registers the ops (``csrc/ops.cpp``) with their CPU kernels; ``fastgrpo._C_cuda``
    (built when a CUDA toolkit was found) adds their CUDA kernels. A failure to load the latter (no CUDA runtime
    of the version it was built against) only leaves the CUDA backend unavailable, with the reason in
    ``CUDA_UNAVAILABLE``. Whether a device's kernels exist is decided here, once: the dispatcher query is opaque
    to torch.compile, and backend selection may first run inside a compiled region."""
    global CUDA_UNAVAILABLE
    from . import _C  # type: ignore[attr-defined]  # noqa: F401  (registers the ops and their CPU kernels; compiled, no stub)

    try:
        from . import _C_cuda  # type: ignore[attr-defined]  # noqa: F401  (registers the CUDA kernels; compiled, no stub)
    except ImportError as exc:  # not built (no toolkit), or its CUDA runtime cannot be loaded here
        CUDA_UNAVAILABLE = str(exc)
    ops = _register("")

    def has_kernels(key: str) -> bool:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgrpo::{op}", key)
            for op in _library.Ops.__dataclass_fields__
        )

    return {device: KernelBackend(device, ops) if has_kernels(device.upper()) else None for device in ("cpu", "cuda")}


# Preference of ``auto`` per device type: fused kernels first, the reference as the last resort. The CUDA
# backend is left out until a GPU run validates its kernels.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}
_NAMED_ONLY = ("cuda",)  # available to backend="cuda", never to auto

_warned: set[str] = set()
_loaded: dict[str, Optional[Backend]] = {}  # backend name → its object (None: not part of this build)
_selected: dict[tuple[str, str], Backend] = {}  # (backend, device type) → the backend running it


def _load(name: str) -> Optional[Backend]:
    """The backend ``name``, or None when it is not part of this build (loaded once)."""
    if name not in _loaded:
        try:
            if name == "reference":
                _loaded[name] = ReferenceBackend()
            elif name == "triton":
                _loaded[name] = _load_triton()
            else:
                _loaded.update(_load_extension())
        except ImportError as exc:  # triton not installed (macOS, Windows), or the extension was not built
            if name not in _warned and name != "cuda":
                _warned.add(name)
                warnings.warn(
                    f"fastgrpo: backend {name!r} unavailable ({exc}); falling back to the next backend", stacklevel=4
                )
            _loaded[name] = None
    return _loaded[name]


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "triton" and device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return name not in ("cpu", "cuda") or name == device.type


def available(device: torch.device) -> list[str]:
    """Names of the backends that can run on ``device``: ``auto``'s order of preference, then the backends
    that run only when named."""
    order = _AUTO_ORDER.get(device.type, ("reference",))
    return [name for name in order + _NAMED_ONLY if _runs_on(name, device) and _load(name) is not None]


def _resolve(backend: str, device: torch.device) -> Backend:
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):  # ends with the reference: always found
            impl = _load(name) if _runs_on(name, device) else None
            if impl is not None:
                return impl
    if not _runs_on(backend, device):
        raise RuntimeError(
            f"backend={backend!r} cannot run on {device.type} tensors"
            + (" (on CPU Triton runs only under the interpreter, TRITON_INTERPRET=1)" if backend == "triton" else "")
            + "; use backend='auto' or 'reference'"
        )
    impl = _load(backend)
    if impl is None:
        why = f": {CUDA_UNAVAILABLE}" if backend == "cuda" and CUDA_UNAVAILABLE else ""
        raise RuntimeError(
            f"backend={backend!r} is not available in this build of fastgrpo{why} "
            f"(available on {device.type}: {available(device)}); use backend='auto' or 'reference'"
        )
    return impl


def select(backend: str, device: torch.device) -> Backend:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    key = (backend, device.type)
    impl = _selected.get(key)
    if impl is None:
        impl = _selected[key] = _resolve(backend, device)
    return impl
