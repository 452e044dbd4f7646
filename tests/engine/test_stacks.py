"""engine.stacks is the one place a stack is described and the one rule for `auto`; every backend
is one file of engine/train/backends registered there, and the recipe names none of them."""

from __future__ import annotations

import ast
import inspect
import typing

import pytest

from engine import stacks
from engine.config import HardwareConfig, RunConfig, config_from_dict
from engine.errors import ConfigError, UserError
from engine.train import backends, recipe
from engine.train.backends.base import Backend, lora_settings

EVERYWHERE = dict.fromkeys(stacks.NAMES, True)


@pytest.mark.parametrize("name", stacks.NAMES)
def test_every_stack_has_one_backend_file_that_names_it(name: str) -> None:
    backend = backends.get(name)
    assert isinstance(backend, Backend) and backend.name == name and backend.stack is stacks.STACKS[name]


def test_an_unknown_backend_is_one_clear_error() -> None:
    with pytest.raises(UserError, match="unknown backend 'vllm'"):
        backends.get("vllm")


def test_the_config_accepts_exactly_auto_and_the_stacks() -> None:
    assert typing.get_args(typing.get_type_hints(HardwareConfig)["backend"]) == ("auto", *stacks.NAMES)


@pytest.mark.parametrize(
    ("cuda", "processes", "installed", "expected", "why"),
    [
        (False, 1, EVERYWHERE, "hf", "auto: no CUDA GPU, and Unsloth needs one"),
        (True, 1, {"unsloth": False}, "hf", "auto: Unsloth is not installed"),
        (True, 2, EVERYWHERE, "hf", "auto: Unsloth trains on one GPU"),
        (True, 1, EVERYWHERE, "unsloth", "auto: Unsloth is installed and a CUDA GPU is present"),
    ],
)
def test_auto_takes_the_first_stack_that_can_train_here(
    cuda: bool, processes: int, installed: dict[str, bool], expected: str, why: str
) -> None:
    assert stacks.choose("auto", cuda=cuda, processes=processes, is_installed=installed) == (expected, why)


def test_an_explicit_stack_that_cannot_run_is_refused_not_replaced() -> None:
    with pytest.raises(UserError, match="unsloth needs a CUDA GPU"):
        stacks.choose("unsloth", cuda=False, is_installed=EVERYWHERE)
    with pytest.raises(UserError, match="unsloth is not installed"):
        stacks.choose("unsloth", cuda=True, is_installed={"unsloth": False})
    assert stacks.choose("hf", cuda=False) == ("hf", "requested in the preset")


def test_the_config_checks_a_stack_with_the_same_facts() -> None:
    data = {"data": {"source": "x.jsonl"}, "hardware": {"backend": "unsloth", "device": "cpu", "gpus": 2}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.problems == stacks.config_problems("unsloth", "cpu", 2)
    assert len(info.value.problems) == 2


def test_one_lora_mapping_from_the_config() -> None:
    cfg = RunConfig()
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.05
    cfg.lora.target_modules, cfg.lora.modules_to_save = ["q_proj", "v_proj"], ["lm_head"]
    import peft

    settings = lora_settings(cfg)
    made = peft.LoraConfig(**settings, task_type="CAUSAL_LM")
    assert (made.r, made.lora_alpha, made.lora_dropout) == (8, 16, 0.05)
    assert set(made.target_modules) == {"q_proj", "v_proj"} and made.modules_to_save == ["lm_head"]


def test_the_recipe_names_no_stack() -> None:
    """The recipe calls its backend's steps; which stack trains is decided in engine.stacks."""
    tree = ast.parse(inspect.getsource(recipe))
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
    }
    code_strings = {s for s in strings if "\n" not in s}  # docstrings may name them in prose
    assert not set(stacks.NAMES) & (code_strings | names)
