"""GGUF through llama.cpp's own tools, when this machine has them. Nothing is downloaded.

    convert_hf_to_gguf.py MODEL_DIR --outfile F.gguf --outtype {f32,f16,bf16,q8_0}
    llama-quantize F.gguf OUT.gguf Q4_K_M

The converter writes the float (or q8_0) types by itself; every other type is the converter's
16-bit output (bf16 or fp16, as merged) requantized by llama-quantize, after which the 16-bit
intermediate is deleted. Where the tools are found, in order:

- $QLC_LLAMA_CPP, a llama.cpp checkout: its convert_hf_to_gguf.py, and llama-quantize in the
  checkout, its build/bin/ or bin/;
- PATH: `convert_hf_to_gguf.py` and `llama-quantize` (what llama.cpp's packages install).

The converter runs under this Python (sys.executable): it needs torch and transformers, which the
engine has, and llama.cpp's `gguf` package, which a checkout carries in gguf-py/.

Pure Python: the console imports this module to say whether GGUF is available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError

ENV = "QLC_LLAMA_CPP"
CONVERTER = "convert_hf_to_gguf.py"
QUANTIZE = "llama-quantize"
# Written by the converter alone (its --outtype values).
CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
# Requantized by llama-quantize from the 16-bit conversion. The IQ types are left out: they need
# an importance matrix (llama-imatrix over calibration text) to be worth using.
QUANTIZE_TYPES = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M",
    "Q5_0", "Q5_1", "Q5_K_S", "Q5_K_M", "Q6_K",
)  # fmt: skip
TYPES = (*QUANTIZE_TYPES, *CONVERTER_TYPES)
GGUF_MAGIC = b"GGUF"

INSTALL_HINT = (
    f"clone and build llama.cpp (github.com/ggml-org/llama.cpp) and set {ENV}=/path/to/llama.cpp, "
    f"or put {CONVERTER} and {QUANTIZE} on PATH"
)


@dataclass(frozen=True)
class LlamaCpp:
    converter: Path
    quantize: Path | None


def check_type(name: str) -> str:
    """A GGUF type, case-insensitive: Q4_K_M, q8_0, bf16 ..."""
    wanted = name.strip().upper()
    if wanted not in TYPES:
        raise UserError(
            f"--gguf {name!r}: not a GGUF type this export makes", f"use one of {', '.join(TYPES)}"
        )
    return wanted


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_llama_cpp(env: dict[str, str] | None = None) -> LlamaCpp | None:
    """The converter and (when found) llama-quantize, or None without a converter."""
    env = dict(os.environ) if env is None else env
    path = env.get("PATH", os.defpath)
    root = env.get(ENV, "").strip()
    converter: Path | None = None
    quantize: Path | None = None
    if root:
        base = Path(root).expanduser()
        if (base / CONVERTER).is_file():
            converter = base / CONVERTER
        for folder in (base, base / "build" / "bin", base / "bin"):
            if _executable(folder / QUANTIZE):
                quantize = folder / QUANTIZE
                break
    if converter is None:
        found = shutil.which(CONVERTER, path=path)
        converter = Path(found) if found else None
    if quantize is None:
        found = shutil.which(QUANTIZE, path=path)
        quantize = Path(found) if found else None
    return LlamaCpp(converter, quantize) if converter else None


def availability(env: dict[str, str] | None = None) -> str:
    """One line for the console: which GGUF types can be made here, or what to install."""
    tools = find_llama_cpp(env)
    if tools is None:
        return f"GGUF: {CONVERTER} not found; {INSTALL_HINT}"
    if tools.quantize is None:
        return f"GGUF: {', '.join(CONVERTER_TYPES)} only ({QUANTIZE} not found)"
    return f"GGUF: llama.cpp at {tools.converter.parent}"


def require(gguf_type: str, env: dict[str, str] | None = None) -> LlamaCpp:
    """The tools this type needs, or a UserError saying what to install."""
    tools = find_llama_cpp(env)
    if tools is None:
        where = (
            f"in ${ENV} ({(env or os.environ)[ENV]}) or on PATH"
            if (env or os.environ).get(ENV)
            else "on PATH"
        )
        raise UserError(f"--gguf {gguf_type}: llama.cpp's {CONVERTER} was not found {where}", INSTALL_HINT)
    if gguf_type not in CONVERTER_TYPES and tools.quantize is None:
        raise UserError(
            f"--gguf {gguf_type}: {QUANTIZE} was not found (the converter alone writes "
            f"{', '.join(CONVERTER_TYPES)})",
            f"build it in llama.cpp (cmake --build build --target {QUANTIZE}) or put it on PATH",
        )
    return tools


class ConversionError(Exception):
    """The converter or llama-quantize failed; the message is its last output line."""


def _run(cmd: list[str], log: Callable[[str], None]) -> None:
    tail: deque[str] = deque(maxlen=5)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            tail.append(line)
            log(line)
    if proc.wait() != 0:
        last = next((t for t in reversed(tail) if "error" in t.lower()), tail[-1] if tail else "")
        raise ConversionError(
            f"{Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name} failed: {last[:200]}"
        )


def convert(
    tools: LlamaCpp, model_dir: Path, out_file: Path, gguf_type: str, dtype: str, log: Callable[[str], None]
) -> Path:
    """Write `out_file` (GGUF of `gguf_type`) from a merged model folder. `dtype` is the folder's
    (bf16/fp16): the 16-bit intermediate keeps it, so nothing is rounded twice."""
    direct = CONVERTER_TYPES.get(gguf_type)
    first = out_file if direct else out_file.with_name(out_file.stem + f".{dtype}.tmp.gguf")
    outtype = direct or ("bf16" if dtype == "bf16" else "f16")
    try:
        _run(
            [
                sys.executable,
                str(tools.converter),
                str(model_dir),
                "--outfile",
                str(first),
                "--outtype",
                outtype,
            ],
            log,
        )
        if not direct:
            assert tools.quantize is not None
            _run([str(tools.quantize), str(first), str(out_file), gguf_type], log)
    finally:
        if first != out_file:
            first.unlink(missing_ok=True)
    try:
        with out_file.open("rb") as f:
            magic = f.read(4)
    except OSError:
        magic = b""
    if magic != GGUF_MAGIC:
        raise ConversionError(f"{out_file.name}: the converter wrote no GGUF file")
    return out_file
