from pathlib import Path

import pytest

from engine.config import RunConfig, apply_overrides, config_from_dict, load_preset, parse_override
from engine.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[2]


def test_overrides_take_full_and_unique_short_keys() -> None:
    cfg = load_preset("tiny-demo", ["train.lr=1e-4", "micro_batch=2", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 1e-4 and cfg.train.micro_batch == 2
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_yaml_1_1_exponents_read_as_floats() -> None:
    assert config_from_dict({"data": {"source": "x"}, "train": {"lr": "2e-4"}}).train.lr == 2e-4


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("tiny-demo", ["train.micro_batch=two", "lora.rr=8", "train.lr=-1"])
    problems = info.value.problems
    assert any("lora.rr: unknown key" in p and "'lora.r'" in p for p in problems)
    assert any("--set train.micro_batch=two: expected int, got 'two'" in p for p in problems)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"train": {"micro_batch": 0}, "data": {"source": "x"}}, "train.micro_batch: must be at least 1"),
        ({"train": {"optimizer": "sgd"}, "data": {"source": "x"}}, "train.optimizer: 'sgd' is not one of"),
        ({"lora": {"dropout": 1.5}, "data": {"source": "x"}}, "lora.dropout"),
        ({"lora": "r=8", "data": {"source": "x"}}, "lora: expected a section"),
        ({"train": {"seq_len": True}, "data": {"source": "x"}}, "train.seq_len: expected int, got True"),
        (
            {"train": {"batch_split": True}, "data": {"source": "x"}},
            "train.batch_split: true (YAML reads yes/no/on/off as a boolean) is not one of 'fixed', 'auto'",
        ),
        ({}, "data.source: required"),
        ({"modle": {}}, "modle: unknown key (did you mean 'model'?)"),
    ],
)
def test_validation_names_the_field(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        config_from_dict(data)
    assert needle in str(info.value)


def test_malformed_and_unknown_override_keys() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_override("nothing=1")


def test_overrides_apply_to_a_copy() -> None:
    data = {"train": {"lr": 1.0}}
    out, problems = apply_overrides(data, ["train.lr=2"])
    assert data == {"train": {"lr": 1.0}} and out["train"]["lr"] == 2 and not problems


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n train: [\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_preset(str(bad))


def test_defaults_are_a_valid_config() -> None:
    assert isinstance(config_from_dict({"data": {"source": "x.jsonl"}}), RunConfig)


def test_a_type_error_does_not_hide_the_range_checks() -> None:
    data = {
        "train": {"lr": "fast", "micro_batch": 0},
        "lora": {"r": "big", "dropout": 1.5},
        "data": {"source": "x"},
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    problems = info.value.problems
    assert any(p.startswith("train.lr: expected float") for p in problems)
    assert any(p.startswith("lora.r: expected int") for p in problems)
    assert "train.micro_batch: must be at least 1, got 0" in problems
    assert "lora.dropout: must be in [0, 1), got 1.5" in problems


def test_a_draft_reads_the_preset_once_and_revalidates_overrides_without_it(tmp_path) -> None:
    from engine.config import draft_preset

    preset = tmp_path / "mine.yaml"
    preset.write_text("# my preset\ndata:\n  source: x.jsonl  # the data\ntrain:\n  lr: 1.0e-4\n")
    draft = draft_preset(str(preset))
    assert draft.valid and draft.value("train.lr") == 1e-4 and "# the data" in draft.text
    preset.unlink()  # the draft does not read the file again
    changed = draft.with_overrides(["lr=2e-4", "train.micro_batch=0"])
    assert not changed.valid and changed.problems == ("--set train.micro_batch=0: must be at least 1, got 0",)
    assert changed.overridden == {"train.lr", "train.micro_batch"}
    assert draft.with_overrides(["lr=2e-4"]).value("train.lr") == 2e-4
    missing = draft_preset(str(preset))
    assert not missing.valid and "not found" in missing.problems[0]


def test_a_problem_an_override_made_names_the_override_not_the_file(tmp_path) -> None:
    """The value came from `--set`: the message says so, and a quoted number is called one."""
    with pytest.raises(ConfigError) as info:
        load_preset("tiny-demo", ["lora.r='32'"])
    assert (
        str(info.value) == "--set lora.r='32': expected int, got the quoted string '32' (remove the quotes)"
    )
    preset = tmp_path / "mine.yaml"
    preset.write_text(
        'model:\n  name_or_path: builtin:tiny-llama\ndata:\n  source: x.jsonl\nlora:\n  r: "32"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_preset(str(preset), ["lora.alpha=0"])
    assert str(info.value) == (
        f"--set lora.alpha=0: must be at least 1, got 0; {preset}: lora.r: expected int, got the quoted "
        "string '32' (remove the quotes)"
    )


def test_an_unknown_key_gets_its_nearest_keys_not_the_whole_list() -> None:
    with pytest.raises(ConfigError) as far:
        load_preset("tiny-demo", ["foo=1"])
    assert len(str(far.value)) < 200 and "`qlc presets NAME` shows every key" in str(far.value)
    with pytest.raises(ConfigError) as near:
        load_preset("tiny-demo", ["lerning_rate=1"])
    assert "(closest: " in str(near.value) and len(str(near.value)) < 200


def test_a_comma_separated_list_is_told_how_to_write_a_list_and_that_form_works() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("tiny-demo", ["lora.target_modules=q_proj,v_proj"])
    assert str(info.value) == (
        "--set lora.target_modules=q_proj,v_proj: expected a list of str, got 'q_proj,v_proj' "
        "(write a list in brackets: lora.target_modules=[q_proj,v_proj])"
    )
    suggested = str(info.value).rsplit(": ", 1)[1].rstrip(")")
    assert load_preset("tiny-demo", [suggested]).lora.target_modules == ["q_proj", "v_proj"]
    # The short key's problem suggests the full key, which works as well.
    with pytest.raises(ConfigError, match=r"lora\.target_modules=\[q_proj\]\)$"):
        load_preset("tiny-demo", ["target_modules=q_proj"])


def test_a_preset_file_is_told_the_list_in_its_own_syntax(tmp_path: Path) -> None:
    preset = tmp_path / "mine.yaml"
    preset.write_text("data:\n  source: x.jsonl\nlora:\n  target_modules: q_proj, v_proj\n")
    with pytest.raises(ConfigError) as info:
        load_preset(str(preset))
    assert str(info.value).endswith(
        "mine.yaml: lora.target_modules: expected a list of str, got 'q_proj, v_proj' "
        "(write a list in brackets: [q_proj,v_proj])"
    )
    preset.write_text("data:\n  source: x.jsonl\nlora:\n  target_modules: [q_proj,v_proj]\n")
    assert load_preset(str(preset)).lora.target_modules == ["q_proj", "v_proj"]


def test_an_unknown_gpu_names_the_preset_file_or_the_set_it_came_from(tmp_path: Path) -> None:
    from engine import preflight
    from engine.config import origin

    preset = tmp_path / "mine.yaml"
    preset.write_text("data:\n  source: x.jsonl\nhardware:\n  gpu: rtx9999\n")
    cfg = load_preset(str(preset))  # the catalog is engine.memory's: checked after loading
    with pytest.raises(UserError) as info:
        preflight.check_gpu_name(cfg, lambda key: origin(str(preset), [], key))
    assert info.value.message.startswith(
        f"{preset}: hardware.gpu: unknown GPU 'rtx9999': the catalog has no such card"
    )
    # From --set, the --set is named instead (and the file not at all).
    overrides = ["hardware.gpu=3080"]
    with pytest.raises(UserError) as info:
        preflight.check_gpu_name(
            load_preset("tiny-demo", overrides), lambda k: origin("tiny-demo", overrides, k)
        )
    assert info.value.message.startswith(
        "--set hardware.gpu=3080: unknown GPU '3080': the catalog has no such card"
    )
    preflight.check_gpu_name(load_preset("tiny-demo", ["hardware.gpu=rtx4090"]))


def test_a_copied_presets_missing_data_names_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.data import DataError, check_source

    copy = tmp_path / "x" / "tiny-demo.yaml"
    copy.parent.mkdir()
    copy.write_text((REPO / "presets" / "tiny-demo.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    cfg = load_preset(str(copy))
    beside = tmp_path / "x" / "data" / "tiny-instruct.jsonl"
    assert cfg.data.source == str(beside)  # a relative path is the preset's folder's
    with pytest.raises(DataError) as info:
        check_source(cfg)
    assert str(info.value).startswith(f"{beside}: not found")  # the place, not data/tiny-instruct.jsonl
    # A relative path from --set is the working folder's.
    assert load_preset(str(copy), ["data.source=mine.jsonl"]).data.source == str(tmp_path / "mine.jsonl")
    beside.parent.mkdir()
    beside.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    )
    assert check_source(load_preset(str(copy))).examples == 1
    # A hub dataset id stays one: the hub says whether it exists.
    assert load_preset(str(copy), ["data.source=someone/dataset"]).data.source == "someone/dataset"
