"""`[model] optimizer`: which parameters Muon and AdamW each take, and the pair stepping as one
optimizer that saves and resumes like a torch optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from ml_playground.configuration import load_config
from ml_playground.module import GPTLightningModule
from ml_playground.optimizers import MuonWithAdamW

SHAPE = [
    ("model.n_layer", "2"),
    ("model.n_head", "2"),
    ("model.n_embd", "16"),
    ("model.block_size", "16"),
    ("data.block_size", "16"),
    ("model.bias", "true"),  # biases too, so every kind of parameter is there
]
MUON_LR, MUON_MOMENTUM = 0.02, 0.95  # default.toml


def module(*flags: tuple[str, str]) -> GPTLightningModule:
    cfg = load_config(flags=[*SHAPE, *flags])
    torch.manual_seed(0)
    return GPTLightningModule(vocab_size=50, tokens_per_batch=64, **cfg.model.model_dump())


def optimizer_of(module: GPTLightningModule) -> tuple[torch.optim.Optimizer, object]:
    setup = module.configure_optimizers()
    return setup["optimizer"], setup["lr_scheduler"]["scheduler"]


def train(module: GPTLightningModule, optimizer, scheduler, steps: int, seed: int) -> list[float]:
    """`steps` steps on random batches drawn from `seed`; the losses."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 50, (4, 16), generator=generator)
        optimizer.zero_grad()
        _, loss = module.model(x, x.roll(-1, dims=1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_muon_takes_exactly_the_block_matrices_and_adamw_the_rest() -> None:
    gpt_module = module(("model.optimizer", "muon"))
    optimizer, _ = optimizer_of(gpt_module)
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in gpt_module.model.named_parameters()}
    by_optimizer: dict[str, list[str]] = {"muon": [], "adamw": []}
    for group in optimizer.param_groups:
        by_optimizer[group["optimizer"]] += [names[id(p)] for p in group["params"]]

    expected_muon = {
        f"transformer.h.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(by_optimizer["muon"]) == expected_muon
    assert len(by_optimizer["muon"]) == len(expected_muon)
    # AdamW: the embeddings (wte is the tied head), the LayerNorms and every bias.
    rest = set(names.values()) - expected_muon
    assert set(by_optimizer["adamw"]) == rest
    assert "transformer.wte.weight" in rest and "transformer.wpe.weight" in rest
    assert any(".bias" in n for n in rest) and any("ln_" in n for n in rest)
    # None in both, none in neither (each parameter once, the tied matrix included once).
    everything = by_optimizer["muon"] + by_optimizer["adamw"]
    assert len(everything) == len(set(everything)) == len(names)
    # The inner optimizers hold the same groups, split by name.
    assert optimizer.muon.param_groups == [
        g for g in optimizer.param_groups if g["optimizer"] == "muon"
    ]
    assert all(p.dim() == 2 for g in optimizer.muon.param_groups for p in g["params"])


def test_settings_reach_each_optimizer() -> None:
    default = optimizer_of(module(("model.optimizer", "muon")))[0]
    muon = default.param_groups[0]
    assert (muon["optimizer"], muon["initial_lr"], muon["momentum"]) == (
        "muon",
        MUON_LR,
        MUON_MOMENTUM,
    )
    assert muon["weight_decay"] == 0.1 and muon["nesterov"]
    chosen, _ = optimizer_of(
        module(
            ("model.optimizer", "muon"),
            ("model.muon_lr", "0.05"),
            ("model.muon_momentum", "0.9"),
            ("model.learning_rate", "0.003"),
            ("model.min_lr", "0.0003"),
            ("model.beta1", "0.8"),
        )
    )
    muon, decayed, plain = chosen.param_groups
    assert (muon["initial_lr"], muon["momentum"]) == (0.05, 0.9)
    assert decayed["initial_lr"] == plain["initial_lr"] == 0.003
    assert muon["lr"] / 0.05 == pytest.approx(decayed["lr"] / 0.003)  # warmup's first step
    assert decayed["betas"] == plain["betas"] == (0.8, 0.99)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    adamw, _ = optimizer_of(module())
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 2


def test_the_schedule_scales_both_learning_rates_alike() -> None:
    flags = [("model.optimizer", "muon"), ("model.warmup_steps", "2"),
             ("model.lr_decay_steps", "6"), ("model.min_lr", "1e-4")]  # fmt: skip
    gpt_module = module(*flags)
    optimizer, scheduler = optimizer_of(gpt_module)
    for _ in range(8):
        muon, adamw = optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"]
        assert muon / MUON_LR == pytest.approx(adamw / 1e-3)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(MUON_LR * 0.1)  # min_lr / lr


def test_one_step_is_muon_and_adamw_each_on_its_own_parameters() -> None:
    """The pair steps exactly as `torch.optim.Muon` and `torch.optim.AdamW` would, each given
    its own groups: nothing of their algorithms is reimplemented here."""
    gpt_module = module(("model.optimizer", "muon"))
    twin = copy.deepcopy(gpt_module)
    optimizer, _ = optimizer_of(gpt_module)
    groups = twin.model.configure_param_groups(0.1, muon=True)
    for group in groups:
        group["lr"] = MUON_LR / 101 if group["optimizer"] == "muon" else 1e-3 / 101
    muon = torch.optim.Muon([g for g in groups if g["optimizer"] == "muon"], momentum=0.95)
    adamw = torch.optim.AdamW(
        [g for g in groups if g["optimizer"] == "adamw"], betas=(0.9, 0.99), fused=True
    )  # fused, as the project's AdamW is on a CPU or GPU
    x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        for model in (gpt_module.model, twin.model):
            model.zero_grad()
            model(x, x.roll(-1, dims=1))[1].backward()
        optimizer.step()
        muon.step()
        adamw.step()
        for (name, a), b in zip(
            gpt_module.model.named_parameters(), twin.model.parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} after step {step}")


def test_state_dict_resumes_exactly() -> None:
    """Saved after k steps and loaded into a fresh module, step k+1 is the same: Muon's
    momentum buffers and AdamW's moments are both in the state."""
    flags = ("model.optimizer", "muon")
    straight = module(flags)
    optimizer, scheduler = optimizer_of(straight)
    train(straight, optimizer, scheduler, 3, seed=0)
    saved = (copy.deepcopy(straight.model.state_dict()), copy.deepcopy(optimizer.state_dict()),
             scheduler.state_dict())  # fmt: skip
    kinds = {frozenset(s) for s in saved[1]["state"].values()}
    assert kinds == {frozenset({"momentum_buffer"}), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    expected = train(straight, optimizer, scheduler, 3, seed=1)

    resumed = module(flags)
    resumed.model.load_state_dict(saved[0])
    optimizer2, scheduler2 = optimizer_of(resumed)
    optimizer2.load_state_dict(saved[1])
    scheduler2.load_state_dict(saved[2])
    assert optimizer2.muon.state is optimizer2.state  # still shared after the load
    assert train(resumed, optimizer2, scheduler2, 3, seed=1) == expected
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_with_adamw_at_zero_muon_still_follows_the_schedule() -> None:
    """learning_rate 0 keeps AdamW's weights still; Muon's peak warms up and decays to 0."""
    flags = [("model.optimizer", "muon"), ("model.learning_rate", "0"), ("model.min_lr", "0"),
             ("model.warmup_steps", "2"), ("model.lr_decay_steps", "6")]  # fmt: skip
    gpt_module = module(*flags)
    optimizer, scheduler = optimizer_of(gpt_module)
    frozen = {name: p.detach().clone() for name, p in gpt_module.model.named_parameters()
              if not name.startswith("transformer.h.") or p.dim() < 2}  # fmt: skip
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        assert all(g["lr"] == 0 for g in optimizer.param_groups[1:])
        train(gpt_module, optimizer, scheduler, 1, seed=len(seen))
    assert seen[:3] == pytest.approx([MUON_LR / 3, MUON_LR * 2 / 3, MUON_LR])
    assert seen[6:] == [0.0, 0.0]
    for name, p in gpt_module.model.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p, frozen[name], rtol=0, atol=0, msg=name)
