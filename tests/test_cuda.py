"""The GPU path: bf16, fused AdamW, torch.compile, the KV cache and the CLI on CUDA.

Skipped where no CUDA device is present (CI); `benchmarks/gpu_check.sh` runs them on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ml_playground.configuration import load_config
from ml_playground.model.gpt import GPT, GPTConfig
from ml_playground.module import GPTLightningModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def tiny_gpt(**overrides: int | float | bool) -> GPT:
    torch.manual_seed(0)
    args = dict(
        block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False
    )
    return GPT(GPTConfig(**{**args, **overrides})).to(CUDA)  # type: ignore[arg-type]


def batch(vocab: int = 96, b: int = 8, t: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.randint(0, vocab, (b, t + 1), device=CUDA, generator=g)
    return x[:, :-1], x[:, 1:]


def test_bf16_autocast_loss_matches_fp32() -> None:
    model = tiny_gpt()
    x, y = batch()
    _, fp32 = model(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, bf16 = model(x, y)
    assert logits.dtype == torch.bfloat16
    assert abs(float(bf16) - float(fp32)) < 0.02 * float(fp32)


def test_compiled_model_matches_eager_and_keeps_names() -> None:
    model = tiny_gpt()
    x, y = batch()
    _, eager = model(x, y)
    names = list(model.state_dict())
    model.compile()
    _, compiled = model(x, y)
    assert torch.allclose(compiled, eager, rtol=1e-3, atol=1e-3)
    assert list(model.state_dict()) == names  # no `_orig_mod.` prefix in checkpoints


def test_kv_cache_generation_matches_full_recompute_on_cuda() -> None:
    model = tiny_gpt().eval()
    prompt = torch.randint(
        0, 96, (3, 5), device=CUDA, generator=torch.Generator(CUDA).manual_seed(2)
    )
    # Inside the window the cache is exact: greedy decoding must agree token for token.
    cached = model.generate(prompt, 40, temperature=0.0)
    full = prompt
    for _ in range(40):
        logits = model(full)[0][:, -1, :]
        full = torch.cat((full, logits.argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, full)


def test_optimizer_is_fused_on_cuda(tmp_path: Path, make_experiment) -> None:
    cfg = load_config([make_experiment(tmp_path)], [])
    module = GPTLightningModule(96, 64, **cfg.model.model_dump()).to(CUDA)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_cli_fit_resume_sample_bf16_compiled(
    tmp_path: Path, make_experiment, cli, optimizer: str
) -> None:
    config = make_experiment(tmp_path)
    gpu = [
        *("--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"),
        *("--model.compile", "true", "--data.pin_memory", "true"),
        *("--model.optimizer", optimizer),
    ]
    cli("prepare", "--config", config, cwd=tmp_path)
    cli("fit", "--config", config, *gpu, "--trainer.max_steps", "10", cwd=tmp_path)
    last = tmp_path / "ckpt" / "ckpt_last_00000010.pt"
    assert last.is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert not any(key.startswith("model._orig_mod") for key in checkpoint["state_dict"])

    cli("fit", "--config", config, *gpu, "--ckpt_path", "last", cwd=tmp_path)
    assert (tmp_path / "ckpt" / "ckpt_last_00000020.pt").is_file()

    result = cli("sample", "--config", config, "--sample.ckpt", "last", cwd=tmp_path)
    assert result.stdout.count("\nthe ") + result.stdout.startswith("the ") == 2  # 2 samples

    run = tmp_path / "logs" / "tiny" / "version_1"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "perf/tokens_per_sec" in tags
    name = torch.cuda.get_device_name()
    if any(gpu_name in name for gpu_name in ("H100", "H200", "A100")):
        mfu = [event.value for event in events.Scalars("perf/mfu")]
        assert mfu and all(0.0 < value < 1.0 for value in mfu)


def test_cli_fit_with_cuda_graphs(tmp_path: Path, make_experiment, cli) -> None:
    """compile_mode reduce-overhead (CUDA graphs) trains, validates and checkpoints."""
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    result = cli(
        "fit", "--config", config, "--trainer.accelerator", "gpu",
        "--trainer.precision", "bf16-mixed", "--model.compile", "true",
        "--model.compile_mode", "reduce-overhead", cwd=tmp_path,
    )  # fmt: skip
    assert "best val/loss" in result.stdout
    assert (tmp_path / "ckpt" / "ckpt_last_00000020.pt").is_file()
