"""Loading, merging, overrides, path resolution and validation of the configuration."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from ml_playground.configuration import (
    load_config,
    load_experiment_toml,
    load_full_experiment_config,
)
from ml_playground.configuration.loading import (
    SAMPLE_OVERRIDES_ENV,
    TRAIN_OVERRIDES_ENV,
    dump_toml,
    packaged_defaults,
)
from ml_playground.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRAIN_OVERRIDES_ENV, raising=False)
    monkeypatch.delenv(SAMPLE_OVERRIDES_ENV, raising=False)


def test_defaults_alone_are_a_valid_config() -> None:
    cfg = load_config()
    defaults = packaged_defaults()
    assert cfg.model.n_layer == defaults["model"]["n_layer"]
    assert cfg.checkpointing.keep.last == defaults["checkpointing"]["keep"]["last"]
    assert cfg.checkpointing.keep.best == defaults["checkpointing"]["keep"]["best"]


def test_shipped_configs_validate(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    # The fine-tuning recipe's GPT-2 XL comes from the hub: a tiny local stand-in of the same
    # context length lets the rest of the recipe validate offline.
    stand_in = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=1024, vocab_size=50257)
    GPT2LMHeadModel(stand_in).save_pretrained(tmp_path / "gpt2")
    for path in sorted((REPO / "configs").glob("*.toml")):
        pretrained = tomllib.loads(path.read_text())["model"].get("init_from", "scratch")
        flags = [] if pretrained == "scratch" else [("model.init_from", str(tmp_path / "gpt2"))]
        cfg = load_config([path], flags)
        assert cfg.experiment == path.stem
        assert cfg.checkpointing.dirpath.is_absolute() and path.stem in str(
            cfg.checkpointing.dirpath
        )


def test_experiment_file_is_deep_merged_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.toml",
        'experiment = "x"\n[model]\nn_layer = 2\n[checkpointing.keep]\nlast = 5\n',
    )
    cfg = load_experiment_toml(path)
    assert cfg.model.n_layer == 2
    assert cfg.model.n_head == packaged_defaults()["model"]["n_head"]  # sibling kept
    assert cfg.checkpointing.keep.last == 5
    assert cfg.checkpointing.keep.best == packaged_defaults()["checkpointing"]["keep"]["best"]


def test_later_config_files_override_earlier(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", "[model]\nn_layer = 2\nn_head = 2\n")
    b = write(tmp_path / "b.toml", "[model]\nn_layer = 3\n")
    cfg = load_config([a, b])
    assert (cfg.model.n_layer, cfg.model.n_head) == (3, 2)


def test_precedence_defaults_files_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path / "e.toml",
        "[trainer]\nmax_steps = 10\nlog_every_n_steps = 3\n[model]\nn_layer = 2\n",
    )
    monkeypatch.setenv(
        TRAIN_OVERRIDES_ENV, '{"trainer": {"max_steps": 20}, "model": {"n_layer": 5}}'
    )
    cfg = load_config([path], [("model.n_layer", "7")], [TRAIN_OVERRIDES_ENV])
    assert cfg.trainer["max_steps"] == 20  # env beats file
    assert cfg.trainer["log_every_n_steps"] == 3  # file beats defaults
    assert cfg.model.n_layer == 7  # flag beats env


def test_env_variable_applies_only_where_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SAMPLE_OVERRIDES_ENV, '{"sample": {"num_samples": 9}}')
    assert load_config(env_vars=[TRAIN_OVERRIDES_ENV]).sample.num_samples != 9
    assert load_config(env_vars=[SAMPLE_OVERRIDES_ENV]).sample.num_samples == 9


def test_load_full_experiment_config_applies_train_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "e.toml", "")
    monkeypatch.setenv(TRAIN_OVERRIDES_ENV, '{"checkpointing": {"keep": {"last": 4}}}')
    assert load_full_experiment_config(path).checkpointing.keep.last == 4
    assert load_experiment_toml(path).checkpointing.keep.last != 4


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"trainer": {"max_stepz": 5}}', "trainer.max_stepz"),
        ('{"model": {"n_layer": "two"}}', "model.n_layer"),
        ('{"checkpointing": {"keep": {"last": -1}}}', "checkpointing.keep.last"),
    ],
)
def test_bad_env_override_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, fragment: str
) -> None:
    monkeypatch.setenv(TRAIN_OVERRIDES_ENV, value)
    with pytest.raises(ConfigError) as info:
        load_config(env_vars=[TRAIN_OVERRIDES_ENV])
    assert TRAIN_OVERRIDES_ENV in str(info.value)
    assert fragment in str(info.value)


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        tmp_path / "configs" / "e.toml",
        'experiment = "exp"\n[prepare]\nsource = "corpus/input.txt"\n'
        '[data]\ndataset_dir = "../datasets/{experiment}"\n'
        '[sample]\nprompt = "FILE:prompt.txt"\nckpt = "ck/x.pt"\n',
    )
    cfg = load_experiment_toml(path)
    assert isinstance(cfg.data.dataset_dir, Path)
    assert cfg.data.dataset_dir.resolve() == (tmp_path / "datasets" / "exp").resolve()
    assert Path(cfg.prepare.source) == tmp_path / "configs" / "corpus" / "input.txt"
    assert cfg.sample.prompt == "FILE:" + str(tmp_path / "configs" / "prompt.txt")
    assert Path(cfg.sample.ckpt) == tmp_path / "configs" / "ck" / "x.pt"
    # Defaults' paths anchor at the working directory.
    assert cfg.log_dir == elsewhere / "lightning_logs"
    assert cfg.checkpointing.dirpath == elsewhere / "checkpoints" / "exp"


def test_urls_aliases_and_flag_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(flags=[("sample.ckpt", "last"), ("data.dataset_dir", "d")])
    assert cfg.prepare.source.startswith("https://")
    assert cfg.sample.ckpt == "last"
    assert cfg.data.dataset_dir == tmp_path / "d"


def test_url_scheme_is_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`HTTPS://` is a URL for the configuration and for the downloader alike (one test)."""
    from ml_playground.sections import is_url

    monkeypatch.chdir(tmp_path)
    for url in ("HTTPS://example.invalid/input.txt", "Http://example.invalid/input.txt"):
        source = load_config(flags=[("prepare.source", url)]).prepare.source
        assert source == url and is_url(source)
    path = write(tmp_path / "e.toml", '[prepare]\nsource = "HTTPS://example.invalid/a.txt"\n')
    assert load_experiment_toml(path).prepare.source == "HTTPS://example.invalid/a.txt"
    assert load_config(flags=[("prepare.source", "https.txt")]).prepare.source == str(
        tmp_path / "https.txt"
    )


def test_flag_values_are_typed_by_the_schema() -> None:
    cfg = load_config(
        flags=[
            ("model.dropout", "0.1"),
            ("model.bias", "true"),
            ("sample.prompt", "42"),  # text field: stays a string
            ("trainer.precision", "bf16-mixed"),
            ("trainer.max_steps", "7"),
        ]
    )
    assert cfg.model.dropout == 0.1 and cfg.model.bias is True
    assert cfg.sample.prompt == "42"
    assert cfg.trainer["precision"] == "bf16-mixed" and cfg.trainer["max_steps"] == 7


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[model]\nn_lyer = 2\n", ["model.n_lyer", "unknown key", "n_layer"]),
        ("[modle]\nn_layer = 2\n", ["modle", "unknown key"]),
        ('[model]\nn_layer = "two"\n', ["model.n_layer", "integer"]),
        ("[model]\nn_layer = 2.0\n", ["model.n_layer"]),
        (
            "[checkpointing.keep]\nlast = -1\n",
            ["checkpointing.keep.last", "greater than or equal to 0"],
        ),
        ("[model]\nn_embd = 30\nn_head = 4\n", ["n_embd (30) must be divisible by n_head (4)"]),
        ("[model]\nwarmup_steps = 50\nlr_decay_steps = 10\n", ["warmup_steps (50)"]),
        ("[data]\nblock_size = 128\n[model]\nblock_size = 64\n", ["data.block_size (128)"]),
        (
            "[trainer]\nmax_stepz = 3\n",
            ["trainer.max_stepz", "unknown key", "max_steps"],
        ),
        (
            "[trainer]\nwarp_speed = 9\n",
            ["trainer.warp_speed", "not an argument of lightning.Trainer"],
        ),
        ('[trainer]\nmax_steps = "many"\n', ["trainer.max_steps"]),
        ('[trainer]\nmax_steps = "5"\n', ["trainer.max_steps", "expected an integer, not text"]),
        ('[model]\nn_layer = "2"\n', ["model.n_layer", "expected an integer, not text"]),
        ("[model]\nbias = 1\n", ["model.bias"]),
        ('[trainer]\nprecision = "bf16-mix"\n', ["trainer.precision"]),
        ("[trainer]\nplugins = []\n", ["trainer.plugins cannot be set"]),
        (
            "[trainer]\naccumulate_grad_batches = 4\nval_check_interval = 10\n",
            ["trainer.val_check_interval (10)", "multiple of trainer.accumulate_grad_batches (4)"],
        ),
        ("[sample]\ntemperature = -1.0\n", ["sample.temperature"]),
        ('experiment = "a b"\n', ["experiment"]),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as info:
        load_experiment_toml(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_not_utf8_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment_toml(tmp_path / "nope.toml")
    latin = tmp_path / "latin.toml"
    latin.write_bytes('[sample]\nprompt = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_experiment_toml(latin)
    broken = write(tmp_path / "broken.toml", "[model\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment_toml(broken)
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[model]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match=r"bom\.toml: .*starts with a byte-order mark"):
        load_experiment_toml(bom)


def test_upper_case_sha256_is_accepted() -> None:
    digest = "86C4E6AA9DB7C042EC79F339DCB96D42B0075E16B8FC2E86BF0CA57E2DC565ED"
    cfg = load_config(flags=[("prepare.source_sha256", digest)])
    assert cfg.prepare.source_sha256 == digest.lower()


def test_bad_flag_names_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^command line: model\.n_layer"):
        load_config(flags=[("model.n_layer", "zero")])
    with pytest.raises(ConfigError, match=r"^command line: trainer\.max_steps = abc"):
        load_config(flags=[("trainer.max_steps", "abc")])


def test_bad_value_names_its_true_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file, the variable or the command line: whichever set the bad value, including the
    keys of a rule across sections and Trainer arguments."""
    path = write(tmp_path / "e.toml", "[model]\nblock_size = 32\n[trainer]\nmax_steps = 5\n")
    monkeypatch.setenv(TRAIN_OVERRIDES_ENV, '{"trainer": {"max_steps": "many"}}')
    with pytest.raises(ConfigError, match=rf"^{TRAIN_OVERRIDES_ENV}: trainer\.max_steps"):
        load_config([path], [], [TRAIN_OVERRIDES_ENV])
    monkeypatch.setenv(TRAIN_OVERRIDES_ENV, '{"data": {"block_size": 64}}')
    with pytest.raises(ConfigError, match=rf"^{TRAIN_OVERRIDES_ENV}: data.block_size \(64\)"):
        load_config([path], [], [TRAIN_OVERRIDES_ENV])
    with pytest.raises(ConfigError, match=r"^command line: data.block_size \(40\)"):
        load_config([path], [("data.block_size", "40")], [TRAIN_OVERRIDES_ENV])
    later = write(tmp_path / "f.toml", "[data]\nblock_size = 64\n")
    with pytest.raises(ConfigError, match=rf"^{later}: data.block_size \(64\) exceeds"):
        load_config([path, later])
    bad = write(tmp_path / "g.toml", "[trainer]\nmax_steps = 1.5\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: trainer\.max_steps"):
        load_config([path, bad], [("model.n_layer", "2")])


def test_trainer_values_are_checked_against_its_signature() -> None:
    cfg = load_config(flags=[("trainer.precision", "bf16-mixed"), ("trainer.devices", "2")])
    assert cfg.trainer["precision"] == "bf16-mixed" and cfg.trainer["devices"] in (2, "2")
    with pytest.raises(ConfigError, match=r"^command line: trainer\.precision"):
        load_config(flags=[("trainer.precision", "bf16-mix")])


def test_dump_round_trips(tmp_path: Path) -> None:
    path = write(
        tmp_path / "e.toml",
        'experiment = "rt"\n[sample]\nprompt = "To be, or \\"not\\"\\n\\tto be\\u0001\\u007f"\n'
        "[trainer]\nlimit_val_batches = 0.5\n",
    )
    cfg = load_experiment_toml(path)
    text = dump_toml(cfg.model_dump(mode="json"))
    tomllib.loads(text)  # valid TOML
    again = write(tmp_path / "other" / "resolved.toml", text)
    assert load_experiment_toml(again) == cfg
    assert cfg.sample.prompt.endswith("to be\x01\x7f")  # control characters survive
    # TOML has no null: None in [trainer] is written as "null" and read back as None.
    assert cfg.trainer["check_val_every_n_epoch"] is None
    assert 'check_val_every_n_epoch = "null"' in text


def test_schema_has_no_defaults_of_its_own() -> None:
    """Defaults have one home (default.toml): every schema field must be required."""
    from pydantic import BaseModel

    from ml_playground.configuration.schema import ExperimentConfig

    def walk(model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            assert info.is_required(), f"{model.__name__}.{name} has a default in code"
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation)

    walk(ExperimentConfig)


def test_parsing_changes_nothing_in_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a configuration seeds no generator, sets no environment variable (Lightning's
    PL_GLOBAL_SEED), adds no warning filter and changes no matmul precision; a hub id in
    model.init_from is not fetched (HF_HUB_OFFLINE: a fetch would fail)."""
    import warnings

    import torch

    path = tmp_path / "exp.toml"
    path.write_text(
        'seed_everything = 123\n[model]\ninit_from = "someone/not-cached-gpt2"\n', encoding="utf-8"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.manual_seed(5)
    rng, environ = torch.get_rng_state(), dict(os.environ)
    filters, precision = list(warnings.filters), torch.get_float32_matmul_precision()
    cfg = load_experiment_toml(path)
    assert cfg.seed_everything == 123 and cfg.model.init_from == "someone/not-cached-gpt2"
    assert torch.equal(torch.get_rng_state(), rng)
    assert dict(os.environ) == environ
    assert warnings.filters == filters and torch.get_float32_matmul_precision() == precision
