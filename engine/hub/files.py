"""Which files of a hub repo a run downloads.

A model repo often holds more than a run loads: the same weights as PyTorch pickles
(`pytorch_model.bin`), the original checkpoint (`original/consolidated.00.pth`, 16 GB for Llama 3.1
8B), GGUF or ONNX exports. A run needs the config, the safetensors weights (exactly the shards the
index names), the tokenizer, the generation config and the chat template: only those are fetched.
Pickle weights run code when they load, so they are refused unless the user opts in
(`model.allow_pickle`).

A dataset repo's files are chosen from its README's `configs:` (the subset, then the split's data
files, as `datasets` reads them), or, without configs, every data file.

Pure Python: the console imports this module.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import yaml

from engine.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Tokenizer and template files besides the JSON ones: SentencePiece models (protobuf, not pickles),
# tiktoken ranks, BPE merges and WordPiece vocabularies.
TOKENIZER_FILES = ("*.model", "*.tiktoken", "merges.txt", "vocab.txt")
TEMPLATE_FOLDER = "additional_chat_templates/"

DATA_SUFFIXES = tuple(
    base + comp
    for base in (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt")
    for comp in ("", ".gz", ".zst", ".bz2", ".xz")
)
# JSON files that describe a saved dataset rather than hold rows.
DATA_METADATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}
README = "README.md"


def _top_level(names: list[str]) -> list[str]:
    return [n for n in names if "/" not in n]


def weights_index(names: list[str], allow_pickle: bool) -> str | None:
    """The weight index to read before choosing shards, if the repo has one."""
    if SAFETENSORS_INDEX in names:
        return SAFETENSORS_INDEX
    if (
        allow_pickle
        and PICKLE_INDEX in names
        and not any(n.endswith(".safetensors") for n in _top_level(names))
    ):
        return PICKLE_INDEX
    return None


def _shards(index: dict[str, Any], index_name: str, names: list[str], where: str, repo: str) -> list[str]:
    shards = sorted(set((index.get("weight_map") or {}).values()))
    missing = [s for s in shards if s not in names]
    if not shards or missing:
        raise UserError(
            f"{where}: {repo}'s {index_name} names "
            + (f"shards the repo does not hold ({missing[0]})" if missing else "no shards"),
            "the repo is incomplete: pick another revision or repo",
        )
    return shards


def model_files(
    names: list[str],
    *,
    repo: str,
    where: str = "model.name_or_path",
    index: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> list[str]:
    """The files of a model repo a run loads, given every file name in the repo and the contents
    of its weight index (`weights_index`), if any."""
    top = _top_level(names)
    pickles = [n for n in top if n.endswith(PICKLE_SUFFIXES)]
    safetensors = [n for n in top if n.endswith(".safetensors")]
    index_name = weights_index(names, allow_pickle)
    if index_name is not None and index is not None:
        weights = _shards(index, index_name, names, where, repo)
    elif "model.safetensors" in top:
        weights = ["model.safetensors"]
    elif safetensors:
        weights = safetensors
    elif pickles and allow_pickle:
        weights = ["pytorch_model.bin"] if "pytorch_model.bin" in top else pickles
    elif pickles:
        raise UserError(
            f"{where}: {repo} has its weights only as PyTorch pickles ({pickles[0]}), which can run code when loaded",
            "use a repo with .safetensors weights, or set model.allow_pickle: true if you trust this one",
        )
    else:
        raise UserError(f"{where}: {repo} holds no model weights (no .safetensors file)", "check the repo id")
    support = [
        n
        for n in top
        if (n.endswith(".json") and not (n == PICKLE_INDEX and not allow_pickle))
        or n.endswith(".jinja")
        or any(fnmatch.fnmatch(n, p) for p in TOKENIZER_FILES)
        or (trust_remote_code and n.endswith(".py"))
    ]
    templates = [n for n in names if n.startswith(TEMPLATE_FOLDER) and n.endswith(".jinja")]
    return sorted(set(support + templates + weights))


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def readme_configs(text: str) -> list[dict[str, Any]]:
    """The `configs:` list of a dataset card's YAML header ([] without one)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return []
    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return []
    configs = header.get("configs") if isinstance(header, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _split_patterns(spec: Any) -> dict[str, list[str]]:
    """A config's `data_files`, in any of the card's spellings, as {split: [patterns]}."""
    if isinstance(spec, str):
        return {"train": [spec]}
    if isinstance(spec, dict):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in spec.items()}
    if isinstance(spec, list) and all(isinstance(x, str) for x in spec):
        return {"train": list(spec)}
    out: dict[str, list[str]] = {}
    for entry in spec if isinstance(spec, list) else []:
        if isinstance(entry, dict) and "split" in entry:
            path = entry.get("path", [])
            out.setdefault(str(entry["split"]), []).extend([path] if isinstance(path, str) else list(path))
    return out


def _matches(name: str, pattern: str) -> bool:
    # `**/` stands for any number of folders, none included (datasets' glob).
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern.replace("**/", ""))


def split_names(split: str) -> list[str]:
    """The splits a `datasets` split expression reads: "train_sft", "train[:10%]", "train+test"."""
    return [re.sub(r"\[.*\]$", "", part).strip() for part in split.split("+") if part.strip()]


def _choose_config(configs: list[dict[str, Any]], subset: str | None, repo: str) -> dict[str, Any]:
    names = [str(c.get("config_name", "default")) for c in configs]
    if subset is not None:
        if subset not in names:
            raise UserError(
                f"data.subset: {subset!r} is not a subset of {repo}", f"its subsets: {', '.join(names)}"
            )
        return configs[names.index(subset)]
    defaults = [c for c in configs if c.get("default")] or [
        c for c in configs if c.get("config_name", "default") == "default"
    ]
    if defaults:
        return defaults[0]
    if len(configs) == 1:
        return configs[0]
    raise UserError(
        f"data.subset: {repo} has several subsets", f"set data.subset to one of {', '.join(names)}"
    )


def dataset_files(
    names: list[str], configs: list[dict[str, Any]], *, repo: str, subset: str | None, split: str
) -> tuple[list[str], dict[str, list[str]] | None]:
    """The data files of a dataset repo that one subset and split read, and, when the card's
    configs say which file belongs to which split, those files by split (None otherwise: `datasets`
    then tells splits apart by file names)."""
    with_files = [c for c in configs if "data_files" in c]
    if with_files:
        config = _choose_config(with_files, subset, repo)
        patterns = _split_patterns(config["data_files"])
        by_split: dict[str, list[str]] = {}
        for name in split_names(split):
            if name not in patterns:
                raise UserError(
                    f"data.split: {name!r} is not a split of {repo}"
                    + (f" (subset {config.get('config_name')})" if config.get("config_name") else ""),
                    f"its splits: {', '.join(patterns)}",
                )
            by_split[name] = sorted(n for n in names if any(_matches(n, p) for p in patterns[name]))
            if not by_split[name]:
                raise UserError(f"data.split: {repo}'s split {name!r} names no file the repo holds")
        return sorted({f for files in by_split.values() for f in files}), by_split
    data = sorted(
        n
        for n in names
        if n.lower().endswith(DATA_SUFFIXES)
        and n.rsplit("/", 1)[-1] not in DATA_METADATA
        and not any(part.startswith(".") for part in n.split("/"))
    )
    if not data:
        scripts = [n for n in names if n.endswith(".py")]
        raise UserError(
            f"data.source: {repo} holds no data files"
            + (f", only a loading script ({scripts[0]}), which datasets no longer runs" if scripts else ""),
            "use a dataset with parquet, JSON or CSV files",
        )
    return data, None
