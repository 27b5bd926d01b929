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
`forward` with `_branch_forward` (an instance attribute), nothing else: no class is patched, parameter
names, state_dict, merge/unmerge and `save_pretrained` stay PEFT's, and the saved adapter is a plain
PEFT DoRA adapter. Heavy imports live inside functions; only `dlm.train` imports this module.
"""

from __future__ import annotations

from typing import Any


def enable_branch_dropout(model: Any) -> int:
    """Put every DoRA adapter on a `peft.tuners.lora.layer.Linear` of `model` into branch mode, in place.

    Call it on the model that is trained (with TRL's `peft_config=`, that is `trainer.model`, after
    the trainer is built). Idempotent. Returns the number of Linear layers now in branch mode (0 when
    the model has no DoRA Linear layer). Embedding/Conv DoRA layers and other LoRA variants are left
    to PEFT. Merged layers never reach the variant (PEFT returns the merged base output), so the
    patch is inert until they are unmerged.
    """
    from peft.tuners.lora.layer import Linear
    from peft.tuners.lora.variants import DoraLinearVariant

    layers = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        patched = False
        for variant in module.lora_variant.values():
            # exact type: subclasses of DoraLinearVariant may have their own maths
            if type(variant) is DoraLinearVariant:
                variant.forward = _branch_forward  # shadows the staticmethod on this instance only
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
