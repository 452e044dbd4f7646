"""Export a run: merge its adapter into the 16-bit base (or copy the adapter alone), check the
result, write a model card, and optionally convert it to GGUF with llama.cpp.

    request.py  what to export and where: checked before anything loads (pure Python)
    card.py     the model card, README.md, from the run's config and events (pure Python)
    gguf.py     finding llama.cpp's converter and running it (pure Python + subprocess)
    merge.py    base in 16-bit + adapter -> merged, saved, reloaded and compared (torch)
    job.py      the engine's `export` mode: the steps above as progress events

The console's face is below: what a request may say, how it is built and checked, and which
GGUF types the installed llama.cpp can write. merge and job run in an engine process.
"""

from engine.export.gguf import CONVERTER_TYPES as GGUF_CONVERTER_TYPES
from engine.export.gguf import TYPES as GGUF_TYPES
from engine.export.gguf import find_llama_cpp
from engine.export.request import (
    DEVICES,
    DTYPES,
    ExportRequest,
    build_request,
    default_dtype,
    default_out_dir,
    request_from_args,
    resolve_source,
)

__all__ = [
    "DEVICES",
    "DTYPES",
    "GGUF_CONVERTER_TYPES",
    "GGUF_TYPES",
    "ExportRequest",
    "build_request",
    "default_dtype",
    "default_out_dir",
    "find_llama_cpp",
    "request_from_args",
    "resolve_source",
]
