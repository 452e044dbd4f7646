"""`python -m engine data CONFIG.yaml`: prepare the run's data exactly as training would and print
the data report.

stdout carries protocol lines: `StageEvent(stage="preparing_data")` progress while it works, then
the report as one JSON object (a line without a "type"). A data problem is one line on stderr
("error: ...") and exit 2. The prepared rows land in the shared cache, so the run that follows
(or its resume) reuses them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.run.events import Emitter, Sink


def main(config: Path, sink: Sink) -> int:
    from engine.config import load_resolved
    from engine.errors import UserError

    emitter = Emitter([sink])
    try:
        cfg = load_resolved(config)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        from engine.data.pipeline import prepare
        from engine.models.loading import load_tokenizer

        prepared = prepare(cfg, load_tokenizer(cfg), emitter.emit)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    how = "reused from the cache" if prepared.from_cache else "prepared and cached"
    print(f"data: {how} in {prepared.seconds:.1f} s ({prepared.cache_path})", file=sys.stderr, flush=True)
    sink.write((json.dumps(prepared.report.to_dict(), ensure_ascii=False) + "\n").encode())
    return 0
