"""The op boundary: GPT-1's fused operations as ``torch.library`` custom ops (``gpt1::``).

Where things live, deliberately:

* **Schemas** are defined once, here, in Python. The CUDA path must work where the
  C++ extension was never built, and the CPU path where Triton is absent, so neither
  backend can own them.
* **CPU kernels** are the C++ functions in ``csrc/``; the extension registers them with
  ``TORCH_LIBRARY_IMPL(gpt1, CPU, m)`` when it loads (``load_cpu_kernels``: the pip-built
  ``engine._C`` or, from a plain checkout, a JIT build of ``csrc/``).
* **CUDA kernels** are the Triton launchers in ``kernels/`` (imported as ``gpt1_kernels``:
  engine._kernels), on first use.
* Each fused operation is one block below, as extension-cpp's ``ops.py`` lays them out: its
  schemas, ``register_fake`` (so ``torch.compile(fullgraph=True)`` traces through it),
  ``register_autograd`` (the forward's backward calls the backward op, or for the LM head
  scales the gradients its forward computed; grads in input order) and its functional wrapper.

The functional wrappers (``causal_attention``, ``add_layernorm``, ``linear_gelu``,
``linear_cross_entropy``) have the signatures of their twins in ``engine.model.reference``,
which is their spec. They handle autocast (inputs cast to the autocast dtype, as ``F.linear``
would) and draw dropout seeds from torch's generator on the tensor's device, so
``torch.manual_seed`` makes fused dropout reproducible.

Setting ``GPT1_CPU_KERNELS=triton`` (with ``TRITON_INTERPRET=1``) serves the CPU from the
Triton launchers instead of C++: the whole fused model then runs Triton under the
interpreter, which is how CI tests the Triton path end to end without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from engine._kernels import kernel_module

_lib = torch.library.Library("gpt1", "DEF")

# Kernel contracts (both backends). Shapes: B batch, T tokens, C width, H heads, N rows.
# Dtypes: float32, float16, bfloat16 (C++ also float64, for gradcheck). Statistics (lse,
# mean, rstd) are float32. `seed` is an int64 tensor of shape (1,) on the input's device,
# or None when dropout_p == 0; a kernel keys its counter-based RNG by (seed, element index)
# and backward regenerates the same mask. `*_dropout_mask` ops return that keep-mask
# (bool) for tests.
SCHEMAS: dict[str, str] = {}  # op → schema, as each block below defines them
_KERNEL_MODULE: dict[str, str] = {}  # op → the kernels/ (Triton) module holding its launcher of the same name


# ---- how an op is defined and where its kernels come from --------------------------------


def _triton_launcher(name: str) -> Callable[..., Any]:
    """The Triton launcher of op `name`, imported on first call (CUDA never needs the C++ ext)."""

    def launch(*args: Any) -> Any:
        try:
            module = kernel_module(_KERNEL_MODULE[name])
        except ImportError as e:
            raise RuntimeError(
                f"gpt1::{name} needs Triton for its CUDA kernel, and importing it failed ({e}); "
                "install triton or build the model with GPT1(config, fused=False)"
            ) from None
        return getattr(module, name)(*args)

    launch.__name__ = name
    return launch


def _define(name: str, schema: str, kernels: str) -> None:
    """Defines gpt1::<name> and registers its CUDA kernel: kernels/<kernels>.py's launcher <name>.
    (The CPU kernels come with the C++ extension: load_cpu_kernels.)"""
    _lib.define(name + schema)
    SCHEMAS[name] = schema
    _KERNEL_MODULE[name] = kernels
    torch.library.register_kernel(f"gpt1::{name}", "cuda", _triton_launcher(name), lib=_lib)


def _no_double_backward(name: str) -> None:
    """A backward op has no derivative of its own: double backward (gradient penalties,
    Hessian-vector products) raises one clear error instead of autograd's silent-wrong-answer warning."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"gpt1::{name}: double backward is not supported by the fused kernels (the backward op "
            "has no derivative); use GPT1(config, fused=False) for higher-order gradients"
        )

    torch.library.register_autograd(f"gpt1::{name}", backward, setup_context=lambda ctx, inputs, output: None, lib=_lib)


_cpu_kernels_error: str | None = None  # why the CPU kernels are unavailable, once tried
_cpu_kernels_tried = False


def _load_extension() -> None:
    """Loads the C++ CPU kernels: the pip-built engine._C if it is fresh, else a JIT build."""
    from engine import _build

    here = Path(__file__).resolve().parent
    built = sorted(here.glob("_C.*.so")) + sorted(here.glob("_C.*.pyd"))
    sources = _build.sources()
    if not sources and not built:
        raise RuntimeError(f"no C++ sources in {_build.CSRC} and no prebuilt engine._C")
    newest_source = max((os.path.getmtime(s) for s in _build.inputs()), default=0.0)
    if built and os.path.getmtime(built[0]) >= newest_source:
        torch.ops.load_library(str(built[0]))
        return
    from torch.utils.cpp_extension import load

    load(
        name="gpt1_engine_C",
        sources=sources,
        extra_cflags=_build.CXX_FLAGS,
        extra_ldflags=_build.LD_FLAGS,
        is_python_module=False,
        verbose=os.environ.get("GPT1_VERBOSE_BUILD") == "1",
    )


def _build_failure_message(e: Exception) -> str:
    """One line saying why, with the compiler's first error line; the whole log goes to a file."""
    import tempfile

    text = f"{type(e).__name__}: {e}"
    if isinstance(e, subprocess.CalledProcessError) and e.output:
        text += "\n" + (e.output.decode(errors="replace") if isinstance(e.output, bytes) else str(e.output))
    cause = e.__cause__
    if cause is not None:
        text += f"\ncaused by {type(cause).__name__}: {cause}"
        if getattr(cause, "output", None):
            out = cause.output
            text += "\n" + (out.decode(errors="replace") if isinstance(out, bytes) else str(out))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the compiler's own words first: a diagnostic, then a missing tool, then anything erroneous
    patterns = (": error:", "fatal error", "not found", "no such file", "error")
    reason = next(
        (line for pat in patterns for line in lines if pat in line.lower() and "error building" not in line.lower()),
        lines[0],
    )
    log = Path(tempfile.gettempdir()) / "gpt1_engine_build_error.log"
    try:
        log.write_text(text)
        where = f" (full log: {log})"
    except OSError:
        where = ""
    return (
        f"the fused CPU kernels are unavailable: building/loading the C++ extension engine._C failed: "
        f"{reason[:300]}{where}. Install a C++ compiler and `pip install --no-build-isolation -e .`, "
        f"or use GPT1(config, fused=False)."
    )


def load_cpu_kernels() -> None:
    """Registers the CPU kernels of every gpt1:: op, once per process.

    Default: the C++ extension. If it cannot be built or loaded (no compiler, say), each op's
    CPU kernel raises one clear error saying why; the reference path is unaffected.
    """
    global _cpu_kernels_tried, _cpu_kernels_error
    if _cpu_kernels_tried:
        return
    _cpu_kernels_tried = True
    backend = os.environ.get("GPT1_CPU_KERNELS", "cpp")
    if backend == "triton":
        for name in SCHEMAS:
            torch.library.register_kernel(f"gpt1::{name}", "cpu", _triton_launcher(name), lib=_lib)
        return
    if backend != "cpp":
        raise ValueError(f"GPT1_CPU_KERNELS must be 'cpp' or 'triton', got {backend!r}")
    try:
        _load_extension()
    except Exception as e:  # a missing compiler surfaces as many exception types
        _cpu_kernels_error = _build_failure_message(e)
        warnings.warn(_cpu_kernels_error, RuntimeWarning, stacklevel=2)

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(_cpu_kernels_error)

        for name in SCHEMAS:
            torch.library.register_kernel(f"gpt1::{name}", "cpu", unavailable, lib=_lib)


def cpu_kernels_error() -> str | None:
    """None if the fused CPU kernels are loaded, else the reason they are not."""
    load_cpu_kernels()
    return _cpu_kernels_error


# ---- what every functional wrapper shares --------------------------------------------------


def _ensure_kernels(t: Tensor) -> None:
    """CPU kernels are loaded (or JIT-built) on first CPU use only: CUDA never needs them."""
    if t.device.type == "cpu":
        load_cpu_kernels()


def _autocast(device_type: str, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Casts floating inputs to the autocast dtype when autocast is on (as F.linear would).

    The one place autocast is handled, for both devices: the kernels then compute in the dtype
    they are given (bf16 GEMMs with fp32 accumulation, fp32 softmax/statistics/loss) and return
    each gradient in its input's dtype; autograd's cast nodes bring the parameters' gradients
    back to fp32 (master weights). Read at call time, so bf16 and fp16 autocast both work;
    add_layernorm is never cast (it computes in fp32 like F.layer_norm under autocast)."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dtype) for t in tensors)
    return tensors


def new_seed(like: Tensor, dropout_p: float) -> Tensor | None:
    """A dropout seed from torch's generator on `like`'s device; None when there is no dropout."""
    if dropout_p == 0:
        return None
    return torch.randint(0, 2**62, (1,), device=like.device, dtype=torch.int64)


def _check_dropout(name: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: dropout_p must be in [0, 1), got {p!r}")


# ---- causal attention ------------------------------------------------------------------------

# qkv (B, T, 3C) → out (B, T, C), lse (B, H, T)
_define("attention_fwd", "(Tensor qkv, int n_head, float dropout_p, Tensor? seed) -> (Tensor, Tensor)", "attention")
# → grad_qkv (B, T, 3C)
_define(
    "attention_bwd",
    "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int n_head, float dropout_p, Tensor? seed) -> Tensor",
    "attention",
)
# → keep (B, H, T, T) bool, upper triangle unspecified
_define(
    "attention_dropout_mask",
    "(Tensor seed, int batch, int n_head, int seq_len, float dropout_p) -> Tensor",
    "attention",
)


@torch.library.register_fake("gpt1::attention_fwd", lib=_lib)
def _(qkv, n_head, dropout_p, seed):
    B, T, C3 = qkv.shape
    return qkv.new_empty(B, T, C3 // 3), qkv.new_empty(B, n_head, T, dtype=torch.float32)


@torch.library.register_fake("gpt1::attention_bwd", lib=_lib)
def _(grad_out, qkv, out, lse, n_head, dropout_p, seed):
    return torch.empty_like(qkv)


@torch.library.register_fake("gpt1::attention_dropout_mask", lib=_lib)
def _(seed, batch, n_head, seq_len, dropout_p):
    return seed.new_empty(batch, n_head, seq_len, seq_len, dtype=torch.bool)


def _attention_setup(ctx, inputs, output):
    qkv, n_head, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.n_head, ctx.dropout_p = n_head, dropout_p


def _attention_backward(ctx, grad_out, grad_lse):
    qkv, out, lse, seed = ctx.saved_tensors
    grad_qkv = torch.ops.gpt1.attention_bwd(grad_out.contiguous(), qkv, out, lse, ctx.n_head, ctx.dropout_p, seed)
    return grad_qkv, None, None, None


torch.library.register_autograd("gpt1::attention_fwd", _attention_backward, setup_context=_attention_setup, lib=_lib)
_no_double_backward("attention_bwd")


def causal_attention(qkv: Tensor, n_head: int, dropout_p: float = 0.0) -> Tensor:
    """Fused causal attention over the QKV projection's output; spec: reference.causal_attention."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * n_head) != 0:
        raise ValueError(
            f"causal_attention: qkv must be (B, T, 3C) with C divisible by n_head={n_head}, "
            f"got shape {tuple(qkv.shape)}"
        )
    _check_dropout("causal_attention", dropout_p)
    _ensure_kernels(qkv)
    (qkv,) = _autocast(qkv.device.type, qkv)
    out, _ = torch.ops.gpt1.attention_fwd(qkv.contiguous(), n_head, dropout_p, new_seed(qkv, dropout_p))
    return out


# ---- add + LayerNorm -------------------------------------------------------------------------

# x, residual (N, C) (residual may be lower precision: a bf16 matmul output under autocast while
# the stream x stays float32, as F.layer_norm); weight, bias (C,) → y (N, C) in x's dtype,
# mean (N,), rstd (N,)
_define(
    "add_layernorm_fwd",
    "(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps, float dropout_p, Tensor? seed)"
    " -> (Tensor, Tensor, Tensor)",
    "add_layernorm",
)
# → grad_x, grad_residual (residual's dtype; empty when dropout_p == 0: it equals grad_x),
#   grad_weight, grad_bias
_define(
    "add_layernorm_bwd",
    "(Tensor grad_y, Tensor x, Tensor residual, Tensor weight, Tensor mean, Tensor rstd, float dropout_p, "
    "Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)",
    "add_layernorm",
)
# → keep (N, C) bool
_define("add_layernorm_dropout_mask", "(Tensor seed, int rows, int cols, float dropout_p) -> Tensor", "add_layernorm")


@torch.library.register_fake("gpt1::add_layernorm_fwd", lib=_lib)
def _(x, residual, weight, bias, eps, dropout_p, seed):
    stat = x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.register_fake("gpt1::add_layernorm_bwd", lib=_lib)
def _(grad_y, x, residual, weight, mean, rstd, dropout_p, seed):
    grad_residual = torch.empty_like(residual) if dropout_p > 0 else x.new_empty(0)
    return torch.empty_like(x), grad_residual, torch.empty_like(weight), torch.empty_like(weight)


@torch.library.register_fake("gpt1::add_layernorm_dropout_mask", lib=_lib)
def _(seed, rows, cols, dropout_p):
    return seed.new_empty(rows, cols, dtype=torch.bool)


def _add_layernorm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed = inputs
    y, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p


def _add_layernorm_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, residual, weight, mean, rstd, seed = ctx.saved_tensors
    grad_x, grad_residual, grad_weight, grad_bias = torch.ops.gpt1.add_layernorm_bwd(
        grad_y.contiguous(), x, residual, weight, mean, rstd, ctx.dropout_p, seed
    )
    if ctx.dropout_p == 0:
        grad_residual = grad_x.to(residual.dtype)  # d(x + r)/dr = 1: the kernel skips writing a copy
    return grad_x, grad_residual, grad_weight, grad_bias, None, None, None


torch.library.register_autograd(
    "gpt1::add_layernorm_fwd", _add_layernorm_backward, setup_context=_add_layernorm_setup, lib=_lib
)
_no_double_backward("add_layernorm_bwd")


def add_layernorm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, dropout_p: float = 0.0
) -> Tensor:
    """Fused LN(x + dropout(residual)); spec: reference.add_layernorm.

    Not autocast to low precision: like F.layer_norm under autocast it computes in float32 and
    returns x's dtype, so the residual stream keeps eager autocast's precision; the residual
    branch (a matmul output) may arrive in bf16/fp16 and is read as is."""
    if x.shape != residual.shape:
        raise ValueError(f"add_layernorm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(
            f"add_layernorm: weight and bias must be ({C},), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    _check_dropout("add_layernorm", dropout_p)
    _ensure_kernels(x)
    y, _, _ = torch.ops.gpt1.add_layernorm_fwd(
        x.reshape(-1, C).contiguous(),
        residual.reshape(-1, C).contiguous(),
        weight,
        bias,
        eps,
        dropout_p,
        new_seed(x, dropout_p),
    )
    return y.view(x.shape)


# ---- bias + GELU (the FFN's first projection) ----------------------------------------------

# x (N, C), weight (F, C), bias (F,) → y = gelu(pre) (N, F), pre = x Wᵀ + b (N, F)
_define("linear_gelu_fwd", "(Tensor x, Tensor weight, Tensor bias, str approximate) -> (Tensor, Tensor)", "linear_gelu")
# → grad_x (N, C), grad_weight (F, C), grad_bias (F,)
_define(
    "linear_gelu_bwd",
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor pre, str approximate) -> (Tensor, Tensor, Tensor)",
    "linear_gelu",
)


@torch.library.register_fake("gpt1::linear_gelu_fwd", lib=_lib)
def _(x, weight, bias, approximate):
    y = x.new_empty(x.shape[0], weight.shape[0])
    return y, torch.empty_like(y)


@torch.library.register_fake("gpt1::linear_gelu_bwd", lib=_lib)
def _(grad_y, x, weight, pre, approximate):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate = inputs
    y, pre = output
    ctx.save_for_backward(x, weight, pre)
    ctx.approximate = approximate


def _linear_gelu_backward(ctx, grad_y, grad_pre):
    x, weight, pre = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.gpt1.linear_gelu_bwd(
        grad_y.contiguous(), x, weight, pre, ctx.approximate
    )
    return grad_x, grad_weight, grad_bias, None


torch.library.register_autograd(
    "gpt1::linear_gelu_fwd", _linear_gelu_backward, setup_context=_linear_gelu_setup, lib=_lib
)
_no_double_backward("linear_gelu_bwd")


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor, approximate: str = "tanh") -> Tensor:
    """Fused GELU(x Wᵀ + b); spec: reference.linear_gelu."""
    C = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != C or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"linear_gelu: expected weight (F, {C}) and bias (F,), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if approximate not in ("tanh", "none"):
        raise ValueError(f"linear_gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
    _ensure_kernels(x)
    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    y, _ = torch.ops.gpt1.linear_gelu_fwd(x.reshape(-1, C).contiguous(), weight, bias, approximate)
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- tied LM head + cross-entropy ----------------------------------------------------------

# hidden (N, C), weight (V, C), targets (N,) int64 → loss () float32 (mean over kept targets),
# grad_hidden (N, C), grad_weight (V, C) of that mean (empty unless compute_grad): the gradients
# come out of the forward, so there is no backward op
_define(
    "linear_cross_entropy_fwd",
    "(Tensor hidden, Tensor weight, Tensor targets, int ignore_index, bool compute_grad) -> (Tensor, Tensor, Tensor)",
    "linear_cross_entropy",
)


@torch.library.register_fake("gpt1::linear_cross_entropy_fwd", lib=_lib)
def _(hidden, weight, targets, ignore_index, compute_grad):
    loss = hidden.new_empty((), dtype=torch.float32)
    if compute_grad:
        return loss, torch.empty_like(hidden), torch.empty_like(weight)
    return loss, hidden.new_empty(0), weight.new_empty(0)


def _linear_cross_entropy_setup(ctx, inputs, output):
    hidden, weight, targets, ignore_index, compute_grad = inputs
    loss, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.compute_grad = compute_grad


def _linear_cross_entropy_backward(ctx, grad_loss, _grad_gh, _grad_gw):
    if not ctx.compute_grad:
        raise RuntimeError(
            "gpt1::linear_cross_entropy_fwd ran with compute_grad=False, so it has no gradients; "
            "call it with compute_grad=True (engine.ops.linear_cross_entropy decides this from "
            "torch.is_grad_enabled() and requires_grad)"
        )
    if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants to autograd
        raise RuntimeError(
            "gpt1::linear_cross_entropy_fwd: double backward is not supported by the fused kernels "
            "(its gradients are computed in the forward); use GPT1(config, fused=False) for "
            "higher-order gradients"
        )
    grad_hidden, grad_weight = ctx.saved_tensors
    return (
        grad_hidden * grad_loss.to(grad_hidden.dtype),
        grad_weight * grad_loss.to(grad_weight.dtype),
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "gpt1::linear_cross_entropy_fwd",
    _linear_cross_entropy_backward,
    setup_context=_linear_cross_entropy_setup,
    lib=_lib,
)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Fused mean CE of the tied LM head, logits never whole; spec: reference.linear_cross_entropy."""
    C = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != C:
        raise ValueError(f"linear_cross_entropy: weight must be (V, {C}), got {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: targets {tuple(targets.shape)} must match hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if targets.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: targets must be int64, got {targets.dtype}")
    _ensure_kernels(hidden)
    hidden, weight = _autocast(hidden.device.type, hidden, weight)
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, _, _ = torch.ops.gpt1.linear_cross_entropy_fwd(
        hidden.reshape(-1, C).contiguous(),
        weight.contiguous(),
        targets.reshape(-1).contiguous(),
        ignore_index,
        compute_grad,
    )
    return loss
