"""DoRA with dropout on the low-rank branch only (`dora_dropout: branch`): no second base matmul.

DoRA (Liu et al. 2024) replaces a frozen weight W (out x in) by  W' = m * (W + s*B@A) / n,  where
n = ||W + s*B@A|| is the per-output-row norm, treated as a constant (detached, paper section 4.3)
and m is the trainable magnitude vector. PEFT computes the layer as the base output plus a delta
(peft/tuners/lora/dora.py, `DoraLinearLayer.forward`), with g = m / n:

    eval, or lora_dropout == 0:   y = Wx + b + (g - 1) * Wx          + g * s * B A x
    train with lora_dropout > 0:  y = Wx + b + (g - 1) * W dropout(x) + g * s * B A dropout(x)

The second line needs W @ dropout(x), a second full matmul per adapted layer (F.linear inside
`DoraLinearLayer.forward`, not a call of the base module), because PEFT feeds the dropped-out input
to the whole DoRA delta. torchtune and mlx-lm drop out the low-rank branch only, as LoRA does:

    branch mode (train):          y = Wx + b + (g - 1) * Wx          + g * s * B A dropout(x)
                                    = g * Wx + b + g * s * B A dropout(x)

which reuses the base output Wx + b that the layer computed anyway. It is exactly PEFT's eval
formula with dropout applied inside the branch, so eval-mode (and dropout-0) outputs are PEFT's own,
bit for bit: in those cases we call PEFT's code unchanged. Both training forms have the same
expectation over dropout masks (dropout rescales by 1/(1-p)); PEFT's also injects noise
(g - 1) * W (dropout(x) - x) into the magnitude path, branch mode does not: a slightly different
regulariser.

Mechanism: PEFT's `lora.Linear.forward` delegates DoRA to a per-layer, per-adapter variant object
(`module.lora_variant[name]`, a `DoraLinearVariant` instance). We shadow that one object's static
`forward` with `_branch_forward` or `_factored_forward` (an instance attribute), nothing else: no class is patched, parameter
names, state_dict, merge/unmerge and `save_pretrained` stay PEFT's, and the saved adapter is a plain
PEFT DoRA adapter. Heavy imports live inside functions; only `dlm.train` imports this module.

The factored norm is also cached: it depends on A, B and W only, which change at an optimizer step,
not between the micro batches of one step (nor in a checkpointed layer's second forward). The cache
key holds a count of optimizer steps taken in this process (a global post-step hook of
`torch.optim`, which fires for every torch optimizer, fused kernels included; those do not bump a
tensor's version counter) and the data pointers and version counters of A, B and W (any other
in-place change: `load_state_dict`, a resumed checkpoint, a user's edit).

Guards (`switch_on`, what `dlm.train.run` calls): the forward stands in for PEFT code, so it is used
only on the PEFT releases it is tested against (`dlm.plan.dora.PEFT_RANGE`; the planner checks the
installed version from package metadata and this module checks `peft.__version__` again), and only
after a parity self-check: on a small DoRA layer built by PEFT with the dtypes of the model's own
adapted layers, under the run's autocast, dlm's forward must give PEFT's outputs and gradients
(input, A, B, magnitude) within `TOLERANCE`. If either check fails the model keeps PEFT's forward,
and the returned `Switch` says why (the run records it as a warn finding).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

from dlm.plan.dora import PEFT_RANGE_TEXT, peft_in_range

_OPTIMIZER_STEPS = [0]  # optimizer steps taken in this process, counted once the hook is registered
_HOOK: list[Any] = []


def _count_optimizer_steps() -> None:
    """Register (once per process) the global post-step hook that invalidates cached norms."""
    if _HOOK:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def bump(optimizer: Any, args: Any, kwargs: Any) -> None:
        _OPTIMIZER_STEPS[0] += 1

    _HOOK.append(register_optimizer_step_post_hook(bump))


def enable_branch_dropout(model: Any, *, factored_norm: bool = False) -> int:
    """Put every DoRA adapter on a `peft.tuners.lora.layer.Linear` of `model` into branch mode, in place.

    Call it on the model that is trained (with TRL's `peft_config=`, that is `trainer.model`, after
    the trainer is built). Idempotent. Returns the number of Linear layers now in branch mode (0 when
    the model has no DoRA Linear layer). Embedding/Conv DoRA layers and other LoRA variants are left
    to PEFT. Merged layers never reach the variant (PEFT returns the merged base output), so the
    patch is inert until they are unmerged.

    `factored_norm=True` also replaces how a training step computes DoRA's row norm (see
    `_factored_forward`): the same maths up to float rounding, without building W + s*B@A, and it
    applies at lora_dropout 0 too. Eval mode still runs PEFT's own code.
    """
    from peft.tuners.lora.layer import Linear
    from peft.tuners.lora.variants import DoraLinearVariant

    if factored_norm:
        _count_optimizer_steps()
    layers = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        patched = False
        for variant in module.lora_variant.values():
            # exact type: subclasses of DoraLinearVariant may have their own maths
            if type(variant) is DoraLinearVariant:
                # shadows the staticmethod on this instance only
                variant.forward = _factored_forward if factored_norm else _branch_forward
                patched = True
        layers += patched
    return layers


def _branch_forward(module: Any, active_adapter: str, x: Any, result: Any, **kwargs: Any) -> Any:
    """`DoraLinearVariant.forward` with dropout on the low-rank branch only.

    `result` is the base layer's output Wx + b, computed once by `lora.Linear.forward` on the
    undropped x; `x` has already been cast to the adapter's dtype there.
    """
    import torch

    dropout = module.lora_dropout[active_adapter]
    if (
        not module.training
        or isinstance(dropout, torch.nn.Identity)
        # with several adapters active at once, `result` already holds the earlier adapters'
        # deltas, so it is not Wx + b: keep PEFT's (exact, slower) path there
        or len(module.active_adapters) > 1
    ):
        peft_forward = type(module.lora_variant[active_adapter]).forward
        return peft_forward(module, active_adapter=active_adapter, x=x, result=result, **kwargs)

    # PEFT's own DoRA delta with base_result given: (g - 1) * (result - b) + g * s * B A(dropout(x)),
    # g = m / ||W + s B A|| (norm detached, fan_in_fan_out and DoraCaching handled in PEFT)
    delta = module.lora_magnitude_vector[active_adapter](
        dropout(x),
        lora_A=module.lora_A[active_adapter],
        lora_B=module.lora_B[active_adapter],
        scaling=module.scaling[active_adapter],
        base_layer=module.get_base_layer(),
        base_result=result,
        adapter_name=active_adapter,
    )
    return result + delta


def _factored_forward(module: Any, active_adapter: str, x: Any, result: Any, **kwargs: Any) -> Any:
    """Branch mode with DoRA's row norm from factors, and the output in one fused expression.

    PEFT builds W + s*B@A (out x in) in every forward (W cast to fp32, B@A through an identity
    matrix) and takes its row norms: several passes over every adapted weight, memory-bound work that
    does not shrink with the batch. Expanding the square gives the same norm from small pieces:

        ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i + s^2 B_i (A A^T) B_i^T

    ||W_i||^2 is constant (W is frozen: computed once per weight, cached on the layer), W A^T is a
    skinny out x r product and A A^T is r x r. The norm stays detached, as in PEFT and the paper. The
    layer's output, g * (Wx) + b + g * s * B A dropout(x) with g = m / n, is computed as
    g * (Wx + s * BA dropout(x)) + b. Layers this does not cover (fan_in_fan_out, quantized or
    non-float weights) take `_branch_forward`; eval and several active adapters take PEFT's code.
    """
    import torch

    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
    if (
        not module.training
        or len(module.active_adapters) > 1
        or module.fan_in_fan_out
        or weight is None
        or not weight.dtype.is_floating_point
        or tuple(weight.shape) != (lora_b.weight.shape[0], lora_a.weight.shape[1])
    ):
        return _branch_forward(module, active_adapter, x, result, **kwargs)
    dora = module.lora_magnitude_vector[active_adapter]
    scale = module.scaling[active_adapter]
    a_w, b_w = lora_a.weight, lora_b.weight
    key = (
        _OPTIMIZER_STEPS[0],
        scale,
        a_w.data_ptr(),
        a_w._version,
        b_w.data_ptr(),
        b_w._version,
        weight.data_ptr(),
        weight._version,
        weight.dtype,
    )
    norm = getattr(dora, "_dlm_norm", None)  # plain attributes: never in the state_dict
    if norm is None or getattr(dora, "_dlm_norm_key", None) != key:
        # Outside autocast: under it the r x r and out x r products would run as tiny bf16 kernels,
        # ~9x slower on a CPU than these fp32 ones (and rounded to bf16 for nothing).
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            w2_key = (weight.data_ptr(), weight._version, weight.dtype)
            if getattr(dora, "_dlm_w2_key", None) != w2_key:
                dora._dlm_w2, dora._dlm_w2_key = weight.float().pow(2).sum(1), w2_key
            a, b = a_w.float(), b_w.float()
            wa = (weight @ a_w.t().to(weight.dtype)).float()  # (out, r)
            norm2 = dora._dlm_w2 + 2 * scale * (wa * b).sum(1) + scale * scale * ((b @ (a @ a.t())) * b).sum(1)
            norm = norm2.clamp_min(0).sqrt()
        dora._dlm_norm, dora._dlm_norm_key = norm, key
    g = (dora.weight / norm).view(1, -1)
    lora = lora_b(lora_a(module.lora_dropout[active_adapter](x)))
    bias = base.bias
    out = torch.add(result - bias if bias is not None else result, lora, alpha=scale) * g
    return out + bias if bias is not None else out


# --- the guards: a version range and a parity self-check before switching a model over ----------

# Largest |dlm - PEFT| over the largest |PEFT|, for the output and for each gradient, by the lowest
# precision in play (the autocast dtype, else the base weight's). PEFT and dlm round in different
# orders: measured on the check layer (CPU), fp32 differs by <= 2e-7, bf16 by <= 7e-3 and fp16 by
# <= 1e-3; a wrong forward (norm from W alone: 1.4; magnitude without gradient: inf) by far more.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 4e-3}
_CHECK_SHAPE = (2, 8, 64, 48, 4)  # batch, tokens, in, out, rank of the check layer


@dataclass(frozen=True)
class Parity:
    """One parity self-check: dlm's `forward` against PEFT's own on a small DoRA layer."""

    forward: str  # which of dlm's forwards: "factored" or "branch"
    ok: bool
    dtype: str  # the check layer's base weight dtype, e.g. "bfloat16"
    autocast: str | None  # the autocast dtype it ran under (the run's), or None
    output_error: float  # max |dlm - PEFT| / max |PEFT| of the layer's output
    grad_error: float  # the same, worst over the gradients of the input, A, B and the magnitude
    tolerance: float
    problem: str = ""  # what differed, or the exception the check raised

    def line(self) -> str:
        where = self.dtype + (f" under {self.autocast} autocast" if self.autocast else "")
        head = f"{self.forward} forward in {where}: outputs {self.output_error:.1e}, gradients {self.grad_error:.1e}"
        return f"{head} (relative; tolerance {self.tolerance:g})" + (f"; {self.problem}" if self.problem else "")


@dataclass(frozen=True)
class Switch:
    """What `switch_on` did: which forward the model's DoRA layers run, and why."""

    forward: Literal["dlm", "peft"]
    layers: int  # DoRA Linear layers put on dlm's forward (0 when it fell back)
    factored_norm: bool
    checks: tuple[Parity, ...]
    reason: str
    code: str = ""  # the warn finding's code when it fell back: dora-forward-parity | dora-forward-peft-version

    def event(self) -> dict[str, Any]:
        """The run's `dora_forward` event."""
        return {
            "forward": self.forward,
            "layers": self.layers,
            "factored_norm": self.factored_norm,
            "checks": [asdict(c) for c in self.checks],
            "reason": self.reason,
        }

    def finding(self) -> dict[str, Any] | None:
        """The run-time warn finding (shaped like the planner's) when it fell back, else None."""
        if not self.code:
            return None
        return {
            "level": "warn",
            "code": self.code,
            "message": f"{self.reason}: this run trains with PEFT's own DoRA forward (correct, only slower)",
            "hint": "set dora_forward: peft to choose PEFT's forward; report the mismatch with the versions "
            "`dlm doctor` lists"
            if self.code == "dora-forward-parity"
            else "install a PEFT in that range (constraints.txt pins peft==0.21.2), or set dora_forward: peft",
            "evidence": {"checks": [asdict(c) for c in self.checks], "tested": PEFT_RANGE_TEXT},
            "tag": "",
        }


def switch_on(
    model: Any, *, factored_norm: bool = True, precision: str = "fp32", peft_version: str | None = None
) -> Switch:
    """Put `model`'s DoRA layers on dlm's training forward if the guards pass; else leave PEFT's.

    `precision` is the run's mixed precision (fp32 | bf16 | fp16: the Trainer's autocast); the check
    layer takes the dtypes and device of the model's first DoRA layer. `peft_version` defaults to the
    imported PEFT's. Checks both forwards a factored run uses (layers the factored norm does not cover
    take the branch forward).
    """
    import peft
    import torch

    layers = _dora_layers(model)
    if not layers:
        return Switch("peft", 0, factored_norm, (), "no DoRA Linear layer to switch")
    version = peft.__version__ if peft_version is None else peft_version
    if not peft_in_range(version):
        reason = f"PEFT {version} is outside {PEFT_RANGE_TEXT}, the releases dlm's DoRA forward is tested against"
        return Switch("peft", 0, factored_norm, (), reason, "dora-forward-peft-version")
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        dtypes = _layer_dtypes(layers[0], autocast)
    except Exception as exc:  # a layer shaped unlike PEFT 0.21's: nothing to check against, keep PEFT's
        reason = f"dlm's DoRA forward could not be checked against this model's DoRA layers ({exc!r:.200})"
        return Switch("peft", 0, factored_norm, (), reason, "dora-forward-parity")
    forwards = {"factored": _factored_forward, "branch": _branch_forward}
    names = ("factored", "branch") if factored_norm else ("branch",)
    checks = tuple(parity_check(forwards[n], n, *dtypes, autocast=autocast) for n in names)
    failed = [c for c in checks if not c.ok]
    if failed:
        reason = "dlm's DoRA forward failed its parity self-check against PEFT's: " + failed[0].line()
        return Switch("peft", 0, factored_norm, checks, reason, "dora-forward-parity")
    count = enable_branch_dropout(model, factored_norm=factored_norm)
    return Switch("dlm", count, factored_norm, checks, "parity self-check passed: " + checks[0].line())


def _dora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora.layer import Linear
    from peft.tuners.lora.variants import DoraLinearVariant

    return [
        m
        for m in model.modules()
        if isinstance(m, Linear) and any(type(v) is DoraLinearVariant for v in m.lora_variant.values())
    ]


def _layer_dtypes(layer: Any, autocast: Any) -> tuple[Any, Any, Any, Any]:
    """(base weight dtype, adapter dtype, magnitude dtype, device) of a model's DoRA layer. A quantized
    base weight is checked as its compute dtype (it is dequantized to that in the forward)."""
    import torch

    name = next(n for n, v in layer.lora_variant.items() if type(v).__name__ == "DoraLinearVariant")
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        base_dtype = weight.dtype
    else:
        base_dtype = getattr(base, "compute_dtype", None) or autocast or torch.float32
    a = layer.lora_A[name].weight
    return base_dtype, a.dtype, layer.lora_magnitude_vector[name].weight.dtype, a.device


def parity_check(
    forward: Any,
    name: str,
    base_dtype: Any,
    adapter_dtype: Any,
    magnitude_dtype: Any,
    device: Any,
    *,
    autocast: Any = None,
) -> Parity:
    """dlm's `forward` against PEFT's own on one small DoRA layer in training mode: outputs and the
    gradients of the input, A, B and the magnitude, relative to PEFT's largest value. The layer's B
    and magnitude are moved off PEFT's init (B = 0 makes DoRA the identity, hiding every error), and
    dlm's copy gets a dropout of p = 0 so that its whole training path runs. Never raises."""
    import torch

    lowest = autocast or base_dtype
    tol = TOLERANCE.get(str(lowest).removeprefix("torch."), TOLERANCE["float16"])
    result: dict[str, Any] = {
        "forward": name,
        "dtype": str(base_dtype).removeprefix("torch."),
        "autocast": str(autocast).removeprefix("torch.") if autocast else None,
        "tolerance": tol,
    }
    try:
        batch, tokens, n_in, n_out, _ = _CHECK_SHAPE
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, tokens, n_in, generator=gen).to(device=device, dtype=base_dtype)
        probe = torch.randn(batch, tokens, n_out, generator=gen).to(device)
        outs, grads = [], []
        for patched in (False, True):
            layer = _check_layer(base_dtype, adapter_dtype, magnitude_dtype, device)
            if patched:
                layer.lora_dropout["default"] = torch.nn.Dropout(0.0)
                layer.lora_variant["default"].forward = forward
            layer.train()
            xi = x.clone().requires_grad_(True)
            ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                y = layer(xi)
            (y.float() * probe).sum().backward()
            params = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
            magnitude = layer.lora_magnitude_vector["default"].weight
            outs.append(y.detach().float())
            grads.append([t.grad for t in (xi, *params, magnitude)])
    except Exception as exc:  # any failure of dlm's code against this PEFT means: keep PEFT's
        return Parity(ok=False, output_error=float("inf"), grad_error=float("inf"), problem=repr(exc)[:300], **result)
    out_err = _relative(outs[1], outs[0])
    labels = ("input", "lora_A", "lora_B", "magnitude")
    grad_errs = {k: _relative(g, want) for k, g, want in zip(labels, grads[1], grads[0], strict=True)}
    worst = max(grad_errs, key=grad_errs.__getitem__)
    grad_err = grad_errs[worst]
    problem = ""
    if not out_err <= tol:
        problem = "the outputs differ"
    elif not grad_err <= tol:
        problem = f"the {worst} gradient differs"
    return Parity(ok=not problem, output_error=out_err, grad_error=grad_err, problem=problem, **result)


def _check_layer(base_dtype: Any, adapter_dtype: Any, magnitude_dtype: Any, device: Any) -> Any:
    """A seeded 64 -> 48 Linear with a PEFT DoRA adapter (r=4), in the given dtypes, off its init."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    _, _, n_in, n_out, rank = _CHECK_SHAPE
    gen = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n_out, n_in, generator=gen) / n_in**0.5)
        base.bias.copy_(0.1 * torch.randn(n_out, generator=gen))
    holder = torch.nn.Sequential()
    holder.add_module("proj", base.to(device=device, dtype=base_dtype))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=True, target_modules=["proj"])
    layer = inject_adapter_in_model(config, holder).proj
    with torch.no_grad():
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        a.weight.copy_(torch.randn(a.weight.shape, generator=gen) / n_in**0.5)
        b.weight.copy_(0.3 * torch.randn(b.weight.shape, generator=gen))
        magnitude = layer.lora_magnitude_vector["default"]
        # within 20% of the true row norms (PEFT's init is ||W + s*BA|| with B = 0): g = m / n is not 1
        scale = layer.scaling["default"]
        norm = (base.weight.float() + scale * b.weight.float() @ a.weight.float()).norm(dim=1)
        jitter = 1 + 0.2 * (2 * torch.rand(n_out, generator=gen) - 1)
        magnitude.weight.copy_(norm * jitter.to(norm.device))
    a.to(adapter_dtype), b.to(adapter_dtype), magnitude.to(magnitude_dtype)
    return layer


def _relative(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (inf when one of them is missing or not finite)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        return float("inf")
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    return err if err == err else float("inf")  # NaN -> inf
