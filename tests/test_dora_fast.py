"""dlm.dora_fast: DoRA with dropout on the low-rank branch only, checked against PEFT itself.

Tiny random Llama (vocab 512, hidden 64, 2 layers), DoRA r=4 on q/k/v/o: 8 adapted layers.
Heavy imports sit inside the tests so the unit tier can collect this file without torch.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
N_LAYERS = 8  # 2 decoder layers x 4 targets


def _tiny_llama(seed: int = 0):
    """Seeded random Llama. initializer_range 0.1 (default 0.02): with a frozen random lm_head of std
    0.02, logits cannot move more than ~1.3 nats however well the adapters learn."""
    import torch
    from transformers import LlamaForCausalLM

    from tests.tinymodel import tiny_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=512, initializer_range=0.1))


def _tiny_dora(dropout: float = 0.1, seed: int = 0):
    """Seeded tiny Llama + PEFT DoRA, adapter made non-trivial (PEFT inits B = 0, so DoRA == base)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(seed),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=TARGETS),
    )
    _perturb(model, seed)
    return model


def _perturb(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _ids(seed: int = 0, batch: int = 4, length: int = 32):
    import torch

    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _adapted(model):
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def test_enable_counts_layers_and_is_idempotent():
    from dlm.train.dora_fast import enable_branch_dropout

    model = _tiny_dora()
    assert enable_branch_dropout(model) == N_LAYERS
    assert enable_branch_dropout(model) == N_LAYERS  # second call: same layers, nothing stacked


def test_eval_logits_identical_to_peft():
    import torch

    from dlm.train.dora_fast import enable_branch_dropout

    ref, fast = _tiny_dora(), _tiny_dora()
    enable_branch_dropout(fast)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=_ids()).logits, fast(input_ids=_ids()).logits)


def test_train_mode_dropout_zero_identical_to_peft():
    import torch

    from dlm.train.dora_fast import enable_branch_dropout

    ref, fast = _tiny_dora(dropout=0.0), _tiny_dora(dropout=0.0)
    enable_branch_dropout(fast)
    ref.train(), fast.train()
    assert torch.equal(ref(input_ids=_ids()).logits, fast(input_ids=_ids()).logits)


@pytest.mark.parametrize("factored", [False, True], ids=["branch", "factored-norm"])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear-bias", "conv1d-fan_in_fan_out"])
def test_train_mode_matches_branch_formula(conv1d, factored):
    """y = g * (W x) + b + g * s * B A dropout(x),  g = m / ||W + s B A|| (rows), with bias and Conv1D."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from dlm.train.dora_fast import enable_branch_dropout

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(12, 16) if conv1d else torch.nn.Linear(16, 12, bias=True)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.proj.bias.normal_()
    p = 0.5
    model = get_peft_model(
        net,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=p, use_dora=True, target_modules=["proj"], fan_in_fan_out=conv1d),
    )
    _perturb(model, 0)
    assert enable_branch_dropout(model, factored_norm=factored) == 1
    model.train()
    x = torch.randn(3, 5, 16)
    torch.manual_seed(123)
    y = model(x)

    layer = _adapted(model)[0]
    base = layer.get_base_layer()
    W = base.weight.T if conv1d else base.weight  # (out, in)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    g = layer.lora_magnitude_vector["default"].weight / (W + s * B @ A).norm(dim=1).detach()
    torch.manual_seed(123)  # the dropout mask is the forward's only random draw
    xd = F.dropout(x, p, training=True)
    ref = g * (x @ W.T) + base.bias + g * s * (xd @ A.T @ B.T)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()  # gradients reach A, B and m
    m = layer.lora_magnitude_vector["default"].weight
    assert all(t.grad is not None for t in (layer.lora_A["default"].weight, B, m))


def test_one_base_matmul_per_layer_in_training():
    """PEFT's second matmul is an F.linear on the base weight inside DoRA, not a base-module call, so
    forward hooks see one call either way: count F.linear calls on the base weights instead."""
    import torch
    from torch.overrides import TorchFunctionMode

    from dlm.train.dora_fast import enable_branch_dropout

    class CountBaseMatmuls(TorchFunctionMode):
        def __init__(self, weights):
            super().__init__()
            self.ptrs, self.n = {w.data_ptr() for w in weights}, 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.linear or getattr(func, "__name__", "") == "linear":
                w = args[1] if len(args) > 1 else kwargs["weight"]
                self.n += w.data_ptr() in self.ptrs
            return func(*args, **kwargs)

    counts = {}
    for name in ("peft", "branch"):
        model = _tiny_dora(dropout=0.1)
        if name == "branch":
            enable_branch_dropout(model)
        model.train()
        layers = _adapted(model)
        hooked = []
        hooks = [m.get_base_layer().register_forward_hook(lambda *a: hooked.append(1)) for m in layers]  # noqa: B023
        with CountBaseMatmuls([m.get_base_layer().weight for m in layers]) as c:
            model(input_ids=_ids()).logits.sum().backward()
        for h in hooks:
            h.remove()
        assert len(hooked) == N_LAYERS  # the module is called once either way
        counts[name] = c.n
    assert counts == {"peft": 2 * N_LAYERS, "branch": N_LAYERS}


@pytest.mark.parametrize("factored", [False, True], ids=["branch", "factored-norm"])
def test_training_lowers_loss_and_moves_every_adapter_param(factored):
    import torch

    from dlm.train.dora_fast import enable_branch_dropout

    model = _tiny_dora(dropout=0.1)
    assert enable_branch_dropout(model, factored_norm=factored) == N_LAYERS
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora_magnitude_vector" in n for n in trainable) == N_LAYERS
    ids = _ids()

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
    params = dict(model.named_parameters())
    unchanged = [n for n, old in trainable.items() if torch.equal(params[n].detach(), old)]
    assert not unchanged
    assert all(k in "".join(trainable) for k in ("lora_A", "lora_B", "lora_magnitude_vector"))


def test_activation_checkpointing_gives_the_same_gradients():
    """TRL checkpoints by default: the recomputed forward must redraw the same branch dropout mask."""
    import torch

    from dlm.train.dora_fast import enable_branch_dropout

    grads = []
    for checkpointing in (False, True):
        model = _tiny_dora(dropout=0.1)
        enable_branch_dropout(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(5)
        ids = _ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


def test_saved_adapter_is_plain_peft(tmp_path):
    import torch
    from peft import PeftModel, get_peft_model_state_dict

    from dlm.train.dora_fast import enable_branch_dropout

    fast, ref = _tiny_dora(), _tiny_dora()
    enable_branch_dropout(fast)
    # same tensor names and shapes as an unpatched PEFT model
    shapes = lambda m: {k: tuple(v.shape) for k, v in get_peft_model_state_dict(m).items()}  # noqa: E731
    assert shapes(fast) == shapes(ref)
    # a training step in branch mode, so the saved adapter is not just the perturbed init
    fast.train()
    ids = _ids()
    fast(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in fast.parameters():
            if p.grad is not None:
                p -= 1e-2 * p.grad
    fast.eval()
    with torch.no_grad():
        want = fast(input_ids=ids).logits
    fast.save_pretrained(tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert "dlm" not in json.dumps(config).lower()

    loaded = PeftModel.from_pretrained(_tiny_llama(0), tmp_path / "adapter")  # fresh base, no dlm code
    loaded.eval()
    variants = [v for m in _adapted(loaded) for v in m.lora_variant.values()]
    assert len(variants) == N_LAYERS and all(v.forward.__module__ == "peft.tuners.lora.variants" for v in variants)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)


def test_multiple_adapters_mixed_batch_and_merge():
    import torch
    from peft import LoraConfig

    from dlm.train.dora_fast import enable_branch_dropout

    model = _tiny_dora(dropout=0.1)
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True, target_modules=TARGETS))
    assert enable_branch_dropout(model) == N_LAYERS
    assert all(v.forward.__module__ == "dlm.train.dora_fast" for m in _adapted(model) for v in m.lora_variant.values())

    model.set_adapter("other")  # the non-default adapter trains in branch mode too
    model.train()
    model(input_ids=_ids()).logits.sum().backward()
    assert all(m.lora_A["other"].weight.grad is not None for m in _adapted(model))

    model.eval()
    # merged layers bypass the variant; unmerging restores the unmerged outputs
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
        model.merge_adapter()
        merged = model(input_ids=_ids()).logits
        model.unmerge_adapter()
        after = model(input_ids=_ids()).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    # PEFT refuses mixed-batch adapter_names with DoRA before any variant code runs (last: PEFT
    # 0.21 leaves its adapter_names pre-hooks registered when a forward raises)
    with pytest.raises(ValueError, match="DoRA"):
        model(input_ids=_ids(batch=2), adapter_names=["default", "other"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_factored_norm_matches_peft_and_branch_in_training(dropout):
    """The factored norm is PEFT's norm up to rounding: same logits and gradients as PEFT at dropout 0,
    as branch mode (same dropout mask) with dropout; eval runs PEFT's code, bit for bit."""
    import torch

    from dlm.train.dora_fast import enable_branch_dropout

    ref, fast = _tiny_dora(dropout=dropout), _tiny_dora(dropout=dropout)
    if dropout:
        enable_branch_dropout(ref)
    assert enable_branch_dropout(fast, factored_norm=True) == N_LAYERS
    ids = _ids()
    grads = []
    for model in (ref, fast):
        model.train()
        torch.manual_seed(7)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    ref.eval(), fast.eval()
    with torch.no_grad():
        if not dropout:
            assert torch.equal(ref(input_ids=ids).logits, fast(input_ids=ids).logits)


def test_factored_norm_keeps_the_adapter_plain_and_follows_weight_changes():
    import torch
    from peft import get_peft_model_state_dict

    from dlm.train.dora_fast import enable_branch_dropout

    fast, ref = _tiny_dora(dropout=0.0), _tiny_dora(dropout=0.0)
    enable_branch_dropout(fast, factored_norm=True)
    fast.train(), ref.train()
    fast(input_ids=_ids())  # fills the per-layer ||W||^2 cache
    assert get_peft_model_state_dict(fast).keys() == get_peft_model_state_dict(ref).keys()
    with torch.no_grad():  # a changed base weight (say, a reload) must not reuse a stale cache
        for model in (fast, ref):
            for m in _adapted(model):
                m.get_base_layer().weight.mul_(1.5)
    torch.testing.assert_close(fast(input_ids=_ids()).logits, ref(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
def test_factored_norm_cache_follows_every_optimizer_step(optimizer):
    """The norm is cached between the micro batches of one step; after every optimizer step (a fused
    AdamW bumps no version counter) the next forward must see the new A and B, as PEFT's code does."""
    import torch

    from dlm.train import dora_fast
    from dlm.train.dora_fast import enable_branch_dropout

    fast, ref = _tiny_dora(dropout=0.0), _tiny_dora(dropout=0.0)
    enable_branch_dropout(fast, factored_norm=True)
    fast.train(), ref.train()
    params = [p for p in fast.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, **{optimizer: True})
    ids = _ids()
    for _step in range(3):
        seen = dora_fast._OPTIMIZER_STEPS[0]
        for micro in range(2):  # two micro batches: the second one reuses the cached norms
            fast(input_ids=ids, labels=ids).loss.backward()
            norms = [m.lora_magnitude_vector["default"]._dlm_norm for m in _adapted(fast)]
            if micro == 0:
                first = norms
        assert all(a is b for a, b in zip(first, norms)), "the second micro batch recomputed the norms"
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert dora_fast._OPTIMIZER_STEPS[0] == seen + 1
        ref.load_state_dict(fast.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# --- the guards: parity in the training precision, the self-check, the fallback ------------------

# Parity of dlm's forward with PEFT's through the whole tiny model at dropout 0, as max |dlm - PEFT| /
# max |PEFT| for the logits and for every trainable parameter's gradient. fp32 rounds at 6e-8 per op:
# measured 7e-7 (logits) and 2e-6 (gradients). bf16 (GPU plans: a bf16 base under bf16 autocast, PEFT's
# fp32 adapter weights) rounds at 3.9e-3 per op and the two forwards round in different orders, through
# two layers and the loss: measured 1.8-2.3e-2 and 2.5-3.6e-2 over three batches, the size of PEFT's own
# bf16 error against its fp32 run (1.6-2.0e-2, 2.5-3.4e-2). So in bf16 the test also asks that dlm's
# run be no further from PEFT's fp32 run than twice PEFT's bf16 run is.
MODEL_TOLERANCE = {"fp32": (1e-5, 1e-4), "bf16": (4e-2, 6e-2)}  # (logits, gradients)


def _relative(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _train_step(dtype, fast: bool):
    """(logits, {name: grad}) of one training forward and backward of the tiny DoRA Llama at dropout 0,
    its base in `dtype` (bf16: under bf16 autocast), on PEFT's forward or dlm's."""
    import contextlib

    import torch
    from peft import LoraConfig, get_peft_model

    from dlm.train.dora_fast import enable_branch_dropout

    base = _tiny_llama(0).to(dtype)  # PEFT keeps the adapter's weights in fp32 (autocast_adapter_dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=TARGETS)
    model = get_peft_model(base, config)
    _perturb(model, 0)
    if fast:
        assert enable_branch_dropout(model, factored_norm=True) == N_LAYERS
    model.train()
    ids = _ids()
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _errors(got, want) -> tuple[float, float]:
    """(logits error, worst gradient error) of one step's results against another's."""
    assert got[1].keys() == want[1].keys() and len(want[1]) == 3 * N_LAYERS  # A, B, magnitude
    return _relative(got[0], want[0]), max(_relative(got[1][n], want[1][n]) for n in want[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dlm_forward_matches_peft_in_the_training_precision(precision):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    peft, dlm = _train_step(dtype, fast=False), _train_step(dtype, fast=True)
    logits_err, grad_err = _errors(dlm, peft)
    logits_tol, grad_tol = MODEL_TOLERANCE[precision]
    assert logits_err <= logits_tol and grad_err <= grad_tol, (logits_err, grad_err)
    if precision == "bf16":  # no worse than bf16 itself: PEFT's own bf16 error against its fp32 run
        truth = _train_step(torch.float32, fast=False)
        for ours, theirs in zip(_errors(dlm, truth), _errors(peft, truth), strict=True):
            assert ours <= 2 * theirs, (ours, theirs)


def _norm_of_w_alone(module, active_adapter, x, result, **kwargs):
    """A wrong forward: DoRA's row norm from W alone, without s*BA (its outputs differ)."""
    base = module.get_base_layer()
    g = (module.lora_magnitude_vector[active_adapter].weight / base.weight.float().norm(dim=1)).view(1, -1)
    lora = module.lora_B[active_adapter](module.lora_A[active_adapter](module.lora_dropout[active_adapter](x)))
    plain = result - base.bias if base.bias is not None else result
    out = (plain + module.scaling[active_adapter] * lora) * g
    return out + base.bias if base.bias is not None else out


def _magnitude_detached(module, active_adapter, x, result, **kwargs):
    """A wrong forward with the right outputs: the magnitude is detached, so it would never learn."""
    base = module.get_base_layer()
    a, b, s = module.lora_A[active_adapter], module.lora_B[active_adapter], module.scaling[active_adapter]
    norm = (base.weight.float() + s * (b.weight.float() @ a.weight.float())).norm(dim=1).detach()
    g = (module.lora_magnitude_vector[active_adapter].weight.detach() / norm).view(1, -1)
    plain = result - base.bias if base.bias is not None else result
    out = (plain + s * b(a(module.lora_dropout[active_adapter](x)))) * g
    return out + base.bias if base.bias is not None else out


def _another_peft_api(module, active_adapter, x, result, **kwargs):
    """A forward written against another PEFT: DoraLinearLayer refuses its arguments (TypeError)."""
    return result + module.lora_magnitude_vector[active_adapter](x, lora=module.lora_A[active_adapter])


CHECKED = [  # (base weight dtype, autocast): the dtypes of fp32, CPU-bf16 and GPU bf16 / fp16 plans
    ("float32", None),
    ("float32", "bfloat16"),
    ("bfloat16", "bfloat16"),
    ("float16", "float16"),
]


@pytest.mark.parametrize(("base_dtype", "autocast"), CHECKED)
def test_parity_check_passes_for_dlm_forwards(base_dtype, autocast):
    import torch

    from dlm.train.dora_fast import TOLERANCE, _branch_forward, _factored_forward, parity_check

    dt = lambda name: getattr(torch, name) if name else None  # noqa: E731
    for name, forward in (("factored", _factored_forward), ("branch", _branch_forward)):
        p = parity_check(
            forward, name, dt(base_dtype), torch.float32, torch.float32, torch.device("cpu"), autocast=dt(autocast)
        )
        assert p.ok, p.line()
        assert p.tolerance == TOLERANCE[autocast or base_dtype]
        assert p.output_error <= p.tolerance and p.grad_error <= p.tolerance


@pytest.mark.parametrize(
    ("forward", "problem"),
    [(_norm_of_w_alone, "the outputs differ"), (_magnitude_detached, "the magnitude gradient differs"),
     (_another_peft_api, "TypeError")],
    ids=["outputs", "gradients", "api"],
)  # fmt: skip
@pytest.mark.parametrize(("base_dtype", "autocast"), [("float32", None), ("bfloat16", "bfloat16")])
def test_parity_check_catches_a_wrong_forward(forward, problem, base_dtype, autocast):
    import torch

    from dlm.train.dora_fast import parity_check

    dt = lambda name: getattr(torch, name) if name else None  # noqa: E731
    p = parity_check(
        forward, "planted", dt(base_dtype), torch.float32, torch.float32, torch.device("cpu"), autocast=dt(autocast)
    )
    assert not p.ok and problem in p.problem, p.line()


def _peft_forwards(model) -> bool:
    return all("forward" not in v.__dict__ for m in _adapted(model) for v in m.lora_variant.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_switch_on_checks_then_switches(precision):
    from dlm.train.dora_fast import switch_on

    model = _tiny_dora(dropout=0.0)
    switch = switch_on(model, precision=precision)
    assert (switch.forward, switch.layers, switch.code, switch.finding()) == ("dlm", N_LAYERS, "", None)
    assert [c.forward for c in switch.checks] == ["factored", "branch"] and all(c.ok for c in switch.checks)
    assert switch.checks[0].autocast == (None if precision == "fp32" else "bfloat16")
    assert not _peft_forwards(model)
    assert switch.event()["forward"] == "dlm" and "parity self-check passed" in switch.reason


def test_switch_on_falls_back_when_the_self_check_fails(monkeypatch):
    """A planted wrong forward never reaches the model: PEFT's forward stays, with a warn finding."""
    import torch

    from dlm.train import dora_fast

    monkeypatch.setattr(dora_fast, "_factored_forward", _norm_of_w_alone)
    model, ref = _tiny_dora(dropout=0.0), _tiny_dora(dropout=0.0)
    switch = dora_fast.switch_on(model)
    assert (switch.forward, switch.layers, switch.code) == ("peft", 0, "dora-forward-parity")
    assert "the outputs differ" in switch.reason and _peft_forwards(model)
    finding = switch.finding()
    assert finding["level"] == "warn" and finding["code"] == "dora-forward-parity"
    assert finding["evidence"]["checks"][0]["ok"] is False
    model.train(), ref.train()
    assert torch.equal(model(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)


def test_switch_on_falls_back_outside_the_tested_peft_range():
    from dlm.train.dora_fast import switch_on

    model = _tiny_dora(dropout=0.0)
    switch = switch_on(model, peft_version="0.23.0")
    assert (switch.forward, switch.layers, switch.code, switch.checks) == ("peft", 0, "dora-forward-peft-version", ())
    assert "0.23.0 is outside >=0.21,<0.22" in switch.reason and _peft_forwards(model)


def test_switch_on_leaves_lora_alone():
    from peft import LoraConfig, get_peft_model

    from dlm.train.dora_fast import switch_on

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    switch = switch_on(model)
    assert (switch.forward, switch.layers, switch.code) == ("peft", 0, "")
