"""TensorBoard holds what a user watches, at steps that match the checkpoint names."""

from __future__ import annotations

import math
import re
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_scalars_text_and_hparams(tmp_path: Path, make_experiment, cli) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    result = cli("fit", "--config", config, "--checkpointing.keep.best", "5",
                 "--trainer.log_every_n_steps", "2", cwd=tmp_path)  # fmt: skip
    run = tmp_path / "logs" / "tiny" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "val/ppl", "lr", "perf/tokens_per_sec",
                "train/grad_norm"):  # fmt: skip
        assert tag in scalars, (tag, scalars)
    # On a CPU there is no peak to compare against: no MFU, and a one-time notice says so.
    assert "perf/mfu" not in scalars
    assert result.stderr.count("MFU is not logged") == 1

    val = events.Scalars("val/loss")
    for e in val:
        assert 0 < e.value < 10
    ppl = {e.step: e.value for e in events.Scalars("val/ppl")}
    for e in val:
        assert math.isclose(ppl[e.step], math.exp(e.value), rel_tol=1e-4)
    assert all(0 < e.value < 1 for e in events.Scalars("lr"))
    assert all(e.value > 0 for e in events.Scalars("perf/tokens_per_sec"))
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))

    # val/loss at step s <-> ckpt_best_{s:08d}_val_loss=<value>.pt
    best = {
        int(m.group(1)): float(m.group(2))
        for p in (tmp_path / "ckpt").iterdir()
        if (m := re.match(r"ckpt_best_(\d{8})_val_loss=(\d+\.\d+)\.pt", p.name))
    }
    assert best
    by_step = {e.step: e.value for e in val}
    for step, value in best.items():
        assert round(by_step[step], 4) == value
    assert sorted(by_step) == [10, 20]

    # A generated text sample at each validation, and the HPARAMS summary with the best metric.
    texts = events.Tensors("sample/text_summary")
    assert [t.step for t in texts] == [10, 20]
    assert texts[-1].tensor_proto.string_val[0].decode().startswith("```")
    assert "hp/best_val/loss" in scalars
    assert math.isclose(events.Scalars("hp/best_val/loss")[-1].value, min(by_step.values()),
                        rel_tol=1e-6)  # fmt: skip
    # Training scalars sit at the optimizer step they were logged in: 2, 4, ..., 20.
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2, 21, 2))


def test_early_stopping_keeps_the_best_checkpoint(tmp_path: Path, make_experiment, cli) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    # The loss falls, so with mode "max" only the first validation is an improvement.
    result = cli("fit", "--config", config, "--checkpointing.mode", "max",
                 "--checkpointing.patience", "1", "--trainer.val_check_interval", "5",
                 cwd=tmp_path)  # fmt: skip
    assert "stopped early: val/loss did not improve for 1 validation(s)" in result.stdout
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[0].startswith("ckpt_best_00000005_")
    assert "ckpt_last_00000010.pt" in names and "ckpt_last_00000020.pt" not in names


def test_sample_output_file(tmp_path: Path, make_experiment, cli) -> None:
    config = make_experiment(tmp_path)
    cli("prepare", "--config", config, cwd=tmp_path)
    cli("fit", "--config", config, "--trainer.max_steps", "10", cwd=tmp_path)
    # Relative to the config file's folder, like every path in a config file.
    config.write_text(
        config.read_text().replace("top_k = 10\n", 'top_k = 10\noutput = "out/s.txt"\n')
    )
    result = cli("sample", "--config", config, cwd=tmp_path / "ckpt")
    written = (tmp_path / "out" / "s.txt").read_text(encoding="utf-8")
    assert written == result.stdout
    assert written.count("-" * 40) == 2


def test_a_corpus_without_newlines_and_a_one_token_context_train_and_sample(
    tmp_path: Path, make_experiment, cli
) -> None:
    """The TensorBoard text sample starts from "\\n"; a char vocabulary without it must not stop
    training. A context of one token (block_size 1) must train, validate and sample."""
    config = make_experiment(tmp_path)
    source = tmp_path / "corpus.txt"
    source.write_text(source.read_text(encoding="utf-8").replace("\n", " "), encoding="utf-8")
    cli("prepare", "--config", config, cwd=tmp_path)
    tiny_context = ("--data.block_size", "1", "--model.block_size", "1")
    cli("fit", "--config", config, "--trainer.max_steps", "10", cwd=tmp_path)
    out = cli("sample", "--config", config, "--sample.prompt", "t", cwd=tmp_path).stdout
    assert out.count("-" * 40) == 2
    cli("fit", "--config", config, *tiny_context, "--trainer.max_steps", "10",
        "--checkpointing.dirpath", "ckpt1", cwd=tmp_path)  # fmt: skip
    out = cli("sample", "--config", config, *tiny_context, "--checkpointing.dirpath", "ckpt1",
              "--sample.prompt", "t", cwd=tmp_path).stdout  # fmt: skip
    assert out.count("-" * 40) == 2
    events = EventAccumulator(str(tmp_path / "logs" / "tiny" / "version_1"))
    events.Reload()
    texts = events.Tensors("sample/text_summary")  # one sample, at the validation of step 10
    assert [t.step for t in texts] == [10]
    text = texts[0].tensor_proto.string_val[0].decode()
    assert text.startswith("```\n") and text.endswith("\n```") and len(text) > 8
