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
