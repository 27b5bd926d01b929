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
"""

from __future__ import annotations

from typing import Any

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
