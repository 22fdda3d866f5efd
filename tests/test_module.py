"""The LightningModule's learning-rate schedule and optimizer groups."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_playground.configuration import load_config
from ml_playground.module import GPTLightningModule, WarmupCosine

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 10, 100


def lrs(schedule: WarmupCosine, steps: range) -> list[float]:
    return [schedule.lr * schedule(step) for step in steps]


def test_warmup_is_linear_and_reaches_lr_at_its_end() -> None:
    schedule = WarmupCosine(WARMUP, DECAY, LR, MIN_LR)
    warm = lrs(schedule, range(WARMUP + 1))
    assert warm[0] > 0  # the first step already trains
    steps = [b - a for a, b in pairwise(warm[:WARMUP])]
    assert all(math.isclose(d, steps[0], rel_tol=1e-9) for d in steps)
    assert all(value < LR for value in warm[:WARMUP])
    assert warm[WARMUP] == pytest.approx(LR)


def test_cosine_decays_to_min_lr_and_stays_there() -> None:
    schedule = WarmupCosine(WARMUP, DECAY, LR, MIN_LR)
    decay = lrs(schedule, range(WARMUP, DECAY + 1))
    assert all(b <= a for a, b in pairwise(decay))
    assert decay[-1] == pytest.approx(MIN_LR)
    middle = WARMUP + (DECAY - WARMUP) // 2
    assert schedule.lr * schedule(middle) == pytest.approx((LR + MIN_LR) / 2)
    for step in (DECAY, DECAY + 1, 10 * DECAY):
        assert schedule.lr * schedule(step) == pytest.approx(MIN_LR)


def test_no_warmup_starts_at_lr() -> None:
    assert WarmupCosine(0, DECAY, LR, MIN_LR)(0) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None, database=None)
@given(
    warmup=st.integers(0, 50),
    span=st.integers(1, 200),
    lr=st.floats(1e-5, 1.0),
    ratio=st.floats(0.0, 1.0),
)
def test_schedule_properties(warmup: int, span: int, lr: float, ratio: float) -> None:
    decay, min_lr = warmup + span, lr * ratio
    schedule = WarmupCosine(warmup, decay, lr, min_lr)
    values = lrs(schedule, range(decay + 5))
    tolerance = 1e-12 * lr
    assert all(0 < v <= lr + tolerance for v in values[:warmup])  # warmup may start below min_lr
    assert all(min_lr - tolerance <= v <= lr + tolerance for v in values[warmup:])
    assert all(b >= a - tolerance for a, b in pairwise(values[: warmup + 1]))
    assert all(b <= a + tolerance for a, b in pairwise(values[warmup:]))
    assert values[warmup] == pytest.approx(lr)
    assert values[decay:] == pytest.approx([min_lr] * (len(values) - decay))


# --------------------------------------------------------------------------- optimizer


@pytest.fixture(scope="module")
def module() -> GPTLightningModule:
    cfg = load_config(
        flags=[
            ("model.n_layer", "2"),
            ("model.n_head", "2"),
            ("model.n_embd", "16"),
            ("model.block_size", "16"),
            ("model.bias", "true"),
            ("model.weight_decay", "0.25"),
            ("model.warmup_steps", str(WARMUP)),
            ("model.lr_decay_steps", str(DECAY)),
            ("model.learning_rate", str(LR)),
            ("model.min_lr", str(MIN_LR)),
            ("data.block_size", "16"),
        ]
    )
    return GPTLightningModule(vocab_size=50, tokens_per_batch=64, **cfg.model.model_dump())


def test_weight_decay_only_on_matrices(module: GPTLightningModule) -> None:
    setup = module.configure_optimizers()
    optimizer = setup["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    params = list(module.parameters())
    assert any(p.dim() < 2 for p in params) and any(p.dim() >= 2 for p in params)

    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    plain = [p for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.25, 0.0}
    assert all(p.dim() >= 2 for p in decayed)
    assert all(p.dim() < 2 for p in plain)
    # Every trainable parameter exactly once (the tied embedding/head included once).
    grouped = [id(p) for p in decayed + plain]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in params if p.requires_grad}
    assert optimizer.param_groups[0]["betas"] == (module.config.beta1, module.config.beta2)


def test_adamw_is_fused_on_a_cpu(module: GPTLightningModule) -> None:
    """torch's fused AdamW kernel, not its per-tensor loop: about 1 ms less per CPU step."""
    optimizer = module.configure_optimizers()["optimizer"]
    assert module.device.type == "cpu" and optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


def test_scheduler_steps_per_optimizer_step(module: GPTLightningModule) -> None:
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]
    assert scheduler["interval"] == "step" and scheduler["frequency"] == 1
    schedule = WarmupCosine(WARMUP, DECAY, LR, MIN_LR)
    seen = []
    for _ in range(DECAY + 3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    assert seen == pytest.approx(lrs(schedule, range(DECAY + 3)))
    assert all(g["lr"] == optimizer.param_groups[0]["lr"] for g in optimizer.param_groups)
