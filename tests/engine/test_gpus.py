"""`--gpu` and hardware.gpu: which numbers are sizes, which are cards the catalog lacks, and which
typos earn a "did you mean" (never another generation or another model of the same line)."""

from __future__ import annotations

import pytest

from engine.errors import UserError
from engine.memory.gpus import gpu_catalog, resolve_gpu


def _refusal(spec: str) -> UserError:
    with pytest.raises(UserError) as info:
        resolve_gpu(spec)
    return info.value


@pytest.mark.parametrize("spec", ["24", "80", "141", "250", "23.99"])
def test_a_bare_number_a_gpu_could_hold_is_a_size(spec: str) -> None:
    gpu = resolve_gpu(spec)
    assert gpu.source == "size" and gpu.total_gb == float(spec)


def test_the_size_bound_is_twice_the_largest_catalog_card() -> None:
    largest = max(g.total_gb for g in gpu_catalog().values())
    assert resolve_gpu(f"{2 * largest:.1f}").source == "size"
    assert "the catalog has no such card" in _refusal(f"{2 * largest + 1:.0f}").message


@pytest.mark.parametrize("spec", ["3080", "3070", "6000", "1080"])
def test_a_card_number_the_catalog_lacks_is_refused_not_read_as_gigabytes(spec: str) -> None:
    """`--gpu 3080` answered FITS on a 3080 GiB GPU."""
    err = _refusal(spec)
    assert err.message.startswith(
        f"unknown GPU {spec!r}: the catalog has no such card, and {spec} is too large"
    )
    assert "give the card's memory instead, e.g. 10GB" in err.hint
    assert "\n" not in str(err)


def test_a_card_number_the_catalog_has_is_that_card_and_units_make_a_size() -> None:
    assert resolve_gpu("4090").name == "rtx4090"
    assert resolve_gpu("3080GB").source == "size"  # a unit says it is meant as memory
    assert resolve_gpu("288GB").total_gb == 288  # so a card beyond the bound is still one retype away


@pytest.mark.parametrize(
    "spec", ["rtx3080", "RTX 3070", "v100", "l40s", "L40S", "a1000", "rtx9090", "rtx4060ti"]
)
def test_another_card_gets_no_suggestion_of_a_catalog_card(spec: str) -> None:
    """difflib offered rtx4080 for rtx3080, rtx4070 for RTX 3070, h100 for v100, l4 for l40s:
    another card's memory figure, believed."""
    err = _refusal(spec)
    assert err.message == f"unknown GPU {spec!r}: the catalog has no such card"
    assert "did you mean" not in str(err) and "give the card's memory instead, e.g. 10GB" in err.hint


@pytest.mark.parametrize(
    ("spec", "card"),
    [
        ("rtx409", "rtx4090"),  # a digit dropped
        ("RTX 409", "rtx4090"),
        ("rtx4900", "rtx4090"),  # two digits swapped
        ("rxt4090", "rtx4090"),  # the family's letters swapped
        ("h10o", "h100"),  # a letter o for a zero
        ("A100-40GiB", "a100-40gb"),
        ("409", "rtx4090"),  # too large for a size, and a 4090 with a digit dropped
    ],
)
def test_a_typo_of_a_catalog_card_gets_it_suggested(spec: str, card: str) -> None:
    err = _refusal(spec)
    assert err.hint.startswith(f"did you mean {card!r}?"), err


def test_a_ti_is_not_suggested_as_its_namesake() -> None:
    """The catalog has no Ti card: a 4090 Ti (or 4060 Ti, of other memory) is not the 4090."""
    assert not any("ti" in name for name in gpu_catalog())
    assert "did you mean" not in str(_refusal("rtx 4090ti"))


def test_a_name_without_a_model_number_lists_the_catalog() -> None:
    err = _refusal("foo")
    assert err.message == "unknown GPU 'foo'" and "known: a10, " in err.hint and "24GB" in err.hint


@pytest.mark.parametrize("spec", ["999TB", "5tib", "8192GB", "-5GB", "-24", "0GB"])
def test_a_size_out_of_range_is_said_to_be_so(spec: str) -> None:
    """`--gpu 999TB` was an "unknown GPU: the catalog has no such card" (give its memory instead),
    though its memory was what it gave; `--gpu=-5GB` too."""
    with pytest.raises(UserError, match="must be between 1 MB and 4096 GB"):
        resolve_gpu(spec)
