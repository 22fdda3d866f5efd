"""Tests of the GPT model: shapes, initialisation, nanoGPT compatibility, KV cache, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from ml_playground.model.gpt import (
    GPT,
    GPTConfig,
    strip_compile_prefix,
)


def make_config(**overrides: object) -> GPTConfig:
    fields: dict[str, object] = dict(
        block_size=16, vocab_size=65, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True
    )
    fields.update(overrides)
    return GPTConfig(**fields)  # type: ignore[arg-type]


def make_model(**overrides: object) -> GPT:
    torch.manual_seed(0)
    return GPT(make_config(**overrides)).eval()


def nanogpt_keys(n_layer: int, bias: bool) -> list[str]:
    """nanoGPT's state-dict keys, in its order."""

    def with_bias(name: str) -> list[str]:
        return [f"{name}.weight", f"{name}.bias"] if bias else [f"{name}.weight"]

    keys = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys += with_bias(f"{h}.{part}")
    return [*keys, *with_bias("transformer.ln_f"), "lm_head.weight"]


def greedy_reference(model: GPT, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """nanoGPT's generation loop with argmax and no cache."""
    block_size = model.config.block_size
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -block_size:])
            idx = torch.cat((idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)), dim=1)
    return idx


def random_tokens(batch: int, length: int, vocab_size: int = 65, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- configuration -------------------------------------------------------------------------


def test_config_rejects_n_embd_not_divisible_by_n_head() -> None:
    with pytest.raises(ValueError, match="divisible"):
        make_config(n_embd=30, n_head=4)


# --- forward -------------------------------------------------------------------------------


def test_training_forward_returns_full_logits_and_loss() -> None:
    model = make_model()
    idx = random_tokens(3, 10)
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 65)
    assert loss is not None and loss.dim() == 0


def test_inference_forward_returns_last_position_only() -> None:
    model = make_model()
    idx = random_tokens(3, 10)
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 65)
    assert loss is None
    full_logits, _ = model(idx, idx)
    torch.testing.assert_close(logits[:, 0], full_logits[:, -1])


def test_loss_at_init_is_close_to_uniform() -> None:
    model = make_model()
    idx = random_tokens(8, 16)
    _, loss = model(idx, random_tokens(8, 16, seed=2))
    assert loss is not None
    assert abs(loss.item() - math.log(65)) < 0.3


def test_targets_of_minus_one_are_ignored() -> None:
    model = make_model()
    idx = random_tokens(2, 8)
    targets = random_tokens(2, 8, seed=2)
    masked = targets.clone()
    masked[:, 4:] = -1
    _, loss = model(idx, masked)
    logits, _ = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :4].reshape(-1, 65), targets[:, :4].reshape(-1)
    )
    assert loss is not None
    torch.testing.assert_close(loss, expected)


def test_sequence_longer_than_block_size_raises() -> None:
    model = make_model(block_size=8)
    with pytest.raises(ValueError, match="block_size is 8"):
        model(random_tokens(1, 9))


# --- parameters and initialisation ---------------------------------------------------------


def test_lm_head_and_token_embedding_share_storage() -> None:
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_names_match_nanogpt(bias: bool) -> None:
    model = make_model(bias=bias)
    assert list(model.state_dict()) == nanogpt_keys(n_layer=2, bias=bias)
    if not bias:
        assert not any(name.endswith(".bias") for name in model.state_dict())


def test_compiled_nanogpt_checkpoint_loads_after_stripping_prefix() -> None:
    source = make_model()
    checkpoint = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.manual_seed(123)
    target = GPT(make_config()).eval()
    target.load_state_dict(strip_compile_prefix(checkpoint))
    idx = random_tokens(2, 8)
    torch.testing.assert_close(target(idx)[0], source(idx)[0])


def test_strip_compile_prefix_leaves_plain_keys_alone() -> None:
    sd = {"_orig_mod.lm_head.weight": 1, "transformer.wte.weight": 2}
    assert strip_compile_prefix(sd) == {"lm_head.weight": 1, "transformer.wte.weight": 2}


def test_init_std_and_scaled_residual_projections() -> None:
    model = make_model(n_layer=4, n_embd=64, n_head=4, vocab_size=500, block_size=64)
    params = dict(model.named_parameters())
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, p in params.items():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name


def test_num_params() -> None:
    model = make_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 32  # minus wpe
    # Tied matrix counted once.
    assert total == sum(v.numel() for v in model.state_dict().values()) - 65 * 32


def test_flops_per_token() -> None:
    model = make_model()
    c = model.config
    expected = 6 * model.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * 16
    assert model.flops_per_token() == expected


# --- KV cache ------------------------------------------------------------------------------


def test_cached_forward_matches_full_forward_at_every_position() -> None:
    model = make_model()
    idx = random_tokens(3, 16)
    with torch.no_grad():
        full_logits, _ = model(idx, idx)  # (B, T, V)
        prefill = 5
        logits, cache = model.forward_with_cache(idx[:, :prefill])
        torch.testing.assert_close(logits, full_logits[:, prefill - 1], atol=1e-5, rtol=1e-5)
        for t in range(prefill, 16):
            logits, cache = model.forward_with_cache(idx[:, t : t + 1], cache, start_pos=t)
            torch.testing.assert_close(logits, full_logits[:, t], atol=1e-5, rtol=1e-5)


def test_cached_forward_in_chunks_matches_full_forward() -> None:
    model = make_model()
    idx = random_tokens(2, 16)
    with torch.no_grad():
        full_logits, _ = model(idx, idx)
        _, cache = model.forward_with_cache(idx[:, :4])
        logits, cache = model.forward_with_cache(idx[:, 4:11], cache, start_pos=4)
        torch.testing.assert_close(logits, full_logits[:, 10], atol=1e-5, rtol=1e-5)


def test_cache_beyond_block_size_raises() -> None:
    model = make_model(block_size=8)
    with torch.no_grad():
        _, cache = model.forward_with_cache(random_tokens(1, 8))
        with pytest.raises(ValueError, match="block_size"):
            model.forward_with_cache(random_tokens(1, 1), cache, start_pos=8)


# --- generation ----------------------------------------------------------------------------


def test_generate_shape_and_keeps_prompt() -> None:
    model = make_model()
    idx = random_tokens(2, 5)
    out = model.generate(idx, max_new_tokens=7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12)
    assert out.dtype == torch.long
    assert torch.equal(out[:, :5], idx)


def test_generate_is_deterministic_with_seeded_generator() -> None:
    model = make_model()
    idx = random_tokens(2, 5)

    def run(seed: int) -> torch.Tensor:
        return model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))


@pytest.mark.parametrize("max_new_tokens", [6, 30])  # within and well beyond block_size 16
def test_greedy_generate_matches_uncached_reference(max_new_tokens: int) -> None:
    model = make_model()
    idx = random_tokens(2, 5)
    out = model.generate(idx, max_new_tokens, temperature=0.0)
    assert torch.equal(out, greedy_reference(model, idx, max_new_tokens))


def test_generate_from_prompt_longer_than_block_size() -> None:
    model = make_model(block_size=8)
    idx = random_tokens(2, 12)
    out = model.generate(idx, 5, temperature=0.0)
    assert torch.equal(out, greedy_reference(model, idx, 5))


def test_top_k_one_equals_greedy() -> None:
    model = make_model()
    idx = random_tokens(2, 5)
    out = model.generate(idx, 25, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, model.generate(idx, 25, temperature=0.0))


def test_tiny_top_p_equals_greedy() -> None:
    model = make_model()
    idx = random_tokens(2, 5)
    out = model.generate(idx, 25, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, model.generate(idx, 25, temperature=0.0))


def test_batched_generation_equals_rows_alone() -> None:
    model = make_model()
    idx = random_tokens(3, 6)
    together = model.generate(idx, 20, temperature=0.0)
    for row in range(3):
        alone = model.generate(idx[row : row + 1], 20, temperature=0.0)
        assert torch.equal(together[row : row + 1], alone)


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    """Through `generate`, with a model whose next-token probabilities are fixed: the final
    LayerNorm outputs its bias alone, and the output matrix turns it into log-probabilities."""
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    model = make_model(vocab_size=4)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = probs.log()
    gen = torch.Generator().manual_seed(0)

    def sampled(top_p: float) -> set[int]:
        out = model.generate(torch.zeros(300, 1, dtype=torch.long), 1, top_p=top_p, generator=gen)
        return set(out[:, 1].tolist())

    assert sampled(0.4) == {1}
    assert sampled(0.75) == {1, 3}
    assert sampled(0.9) == {1, 2, 3}
    assert sampled(1.0) == {0, 1, 2, 3}


def test_top_k_larger_than_vocab_is_clamped() -> None:
    model = make_model()
    idx = random_tokens(2, 3)
    clamped = model.generate(idx, 8, top_k=1000, generator=torch.Generator().manual_seed(3))
    plain = model.generate(idx, 8, generator=torch.Generator().manual_seed(3))
    assert clamped.shape == (2, 11)
    assert torch.equal(clamped, plain)  # every token stays a candidate


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_generate_rejects_bad_sampling_settings(kwargs: dict[str, float]) -> None:
    model = make_model()
    with pytest.raises(ValueError):
        model.generate(random_tokens(1, 3), 2, **kwargs)  # type: ignore[arg-type]


def test_refresh_keep_matches_its_reference_and_exact_mode_within_the_window() -> None:
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16,
                       dropout=0.0, bias=True)  # fmt: skip
    model = GPT(config).eval()
    prompt = torch.randint(0, 11, (3, 2))
    within = model.generate(prompt, 6, temperature=0.0, refresh_keep=5)
    assert torch.equal(within, model.generate(prompt, 6, temperature=0.0))

    keep, new = 5, 20
    out = model.generate(prompt, new, temperature=0.0, refresh_keep=keep)
    # Reference: the context is everything since the last refill; a full window refills
    # from its last `keep` tokens.
    idx, start = prompt.clone(), 0
    with torch.no_grad():
        for _ in range(new):
            if idx.size(1) - start >= config.block_size:
                start = idx.size(1) - keep
            logits, _ = model(idx[:, start:])
            idx = torch.cat((idx, logits[:, -1, :].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(out, idx)


def test_vocab_limit_never_picks_padding_tokens() -> None:
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16,
                       dropout=0.0, bias=False)  # fmt: skip
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight[50:] += 5.0  # make the padding ids the likeliest ones
    g = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros((4, 1), dtype=torch.long), 30, temperature=1.0,
                         vocab_limit=50, refresh_keep=6, generator=g)  # fmt: skip
    assert int(out.max()) < 50
