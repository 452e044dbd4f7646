"""`prepare`: a run's dataset, from its config and its tokenizer, to datasets a Trainer consumes.

Runs in the engine process. The prepared rows live in the on-disk cache (cache.py): the first
preparation builds them (build.py: read and validate -> limit to max_examples -> split off
validation -> template, tokenize, mask -> fit seq_len (truncate or drop, counted) -> pack or pad ->
report), every later one with the same data, settings and tokenizer (a resume, a second run,
`qlc data`) memory-maps them.
"""

from __future__ import annotations

import errno
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.config import RunConfig
from engine.data import cache
from engine.data.check import check_config
from engine.data.collate import PadCollator, pad_token_id
from engine.data.errors import DataError
from engine.data.masking import EncoderSpec, spec_digest
from engine.data.progress import Emit, stage
from engine.data.report import DataReport, with_schedule
from engine.data.sources import is_local, local_files
from engine.data.templates import ChatTemplate, end_of_turn_ids, resolve_template
from engine.errors import UserError


@dataclass
class PreparedData:
    train: Any
    """datasets.Dataset: input_ids, labels (and seq_lengths when packed), memory-mapped."""
    eval: Any | None
    collator: PadCollator
    report: DataReport
    template: ChatTemplate | None
    """The chat template the data was rendered with; sampling must use the same one."""
    end_of_turn_ids: list[int] = field(default_factory=list)
    """Token ids that end an assistant turn: what generation stops on."""
    cache_path: str = ""
    from_cache: bool = False
    """True when an earlier preparation's rows were reused."""
    seconds: float = 0.0


def one_segment_length(*datasets: Any) -> int | None:
    """The token length every attention segment of these prepared datasets has (each row; each
    example of a packed row), or None when there are several (or no rows). As the one-row
    padding-free batches see them; a padded batch of packed rows also has one padding segment
    per short row. Read from the Arrow columns without materialising a row: the whole of a
    200,000-example set takes milliseconds.
    A dataset viewing a subset of its table (an indices mapping) is judged by the whole table,
    which can only turn an answer into None; a dataset without an Arrow table gives None."""
    import pyarrow.compute as pc

    lengths: set[int] = set()
    for ds in datasets:
        if ds is None:
            continue
        table = getattr(ds, "data", None)
        table = getattr(table, "table", table)  # datasets' memory-mapped wrapper, or the table
        if not hasattr(table, "column_names") or "input_ids" not in table.column_names:
            return None  # not an Arrow-backed prepared set (a stream): nothing to say
        if "seq_lengths" in table.column_names:
            column = pc.list_flatten(table.column("seq_lengths"))
        else:
            column = pc.list_value_length(table.column("input_ids"))
        if len(column) == 0:
            continue
        low, high = pc.min_max(column).values()
        lengths |= {int(low.as_py()), int(high.as_py())}
        if len(lengths) > 1:
            return None
    return lengths.pop() if lengths else None


def _template(tokenizer: Any, name: str) -> tuple[ChatTemplate | None, DataError | None]:
    """The template, or why there is none: that matters only if the data holds conversations."""
    try:
        return resolve_template(tokenizer, name), None
    except DataError as exc:
        return None, exc


def _sources(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the data is, for the cache key (each local file's content hash; a hub split's
    fingerprint), and the opened hub datasets."""
    d = cfg.data
    described: dict[str, Any] = {}
    hub: dict[str, Any] = {}
    for name, source in (("source", d.source), ("val_source", d.val_source)):
        if not source:
            continue
        if is_local(source):
            described[name] = [[str(p), p.stat().st_size, cache.file_digest(p)] for p in local_files(source)]
        else:
            from engine.data.hub import open_hub

            split = "validation" if name == "val_source" and source == d.source else d.split
            revision = d.revision if source == d.source else d.val_revision  # a run's pinned commits
            dataset = hub[(source, split)] = open_hub(source, d.subset, split, revision)
            described[name] = [source, d.subset, split, revision, getattr(dataset, "_fingerprint", None)]
    return described, hub


def prepare(
    cfg: RunConfig, tokenizer: Any, progress: Emit | None = None, workers: int | None = None
) -> PreparedData:
    """The run's datasets: from the cache when this data was prepared before, else built (and
    cached). `progress` receives `StageEvent(stage="preparing_data")`s, a few a second at most.
    `workers` overrides the number of tokenizing processes (0: this process)."""
    started = time.monotonic()
    d = cfg.data
    check_config(d)
    template, template_error = _template(tokenizer, d.template)
    spec = EncoderSpec.of(tokenizer, template, d.responses_only, cfg.train.seq_len, template_error)
    described, hub = _sources(cfg)
    key = cache.key_of(
        {
            "code": cache.code_digest(),
            # bad_records: stop adds nothing to the key, so data prepared before the setting
            # existed is found again (stop prepares exactly what it did then).
            "data": {k: v for k, v in asdict(d).items() if (k, v) != ("bad_records", "stop")},
            "seq_len": cfg.train.seq_len,
            "encoder": spec_digest(spec),
            "sources": described,
        }
    )
    try:
        if cache.is_locked(key):
            stage(progress, "waiting for another process preparing the same data")
        with cache.locked(key):
            entry = cache.load(key)
            from_cache = entry is not None
            if entry is None:
                entry = _build(cfg, tokenizer, spec, template, key, progress, hub, workers)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"{cache.cache_dir()}: no space left for the prepared data ({exc.strerror})",
                "free disk space, or point QLC_CACHE_DIR at a larger disk",
            ) from None
        raise
    if from_cache:
        stage(progress, f"reusing the data prepared before ({entry.path.name[:12]})")
    return _prepared(entry, cfg, tokenizer, template, started, from_cache)


def _build(
    cfg: RunConfig,
    tokenizer: Any,
    spec: EncoderSpec,
    template: ChatTemplate | None,
    key: str,
    progress: Emit | None,
    hub: dict[str, Any],
    workers: int | None,
) -> cache.Entry:
    from engine.data.build import Build

    folder = cache.new_folder(key)
    try:
        meta = Build(cfg, tokenizer, spec, template, folder, progress, hub, workers).run()
        stage(progress, "saving the prepared rows to the data cache")
        return cache.publish(folder, key, meta)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _prepared(
    entry: cache.Entry,
    cfg: RunConfig,
    tokenizer: Any,
    template: ChatTemplate | None,
    started: float,
    from_cache: bool,
) -> PreparedData:
    import datasets

    meta = entry.meta
    if not meta.get("template_used"):
        template = None
    report = with_schedule(DataReport.from_dict(meta["report"]), cfg)
    eval_path = entry.eval
    return PreparedData(
        train=datasets.Dataset.from_file(str(entry.train)),
        eval=datasets.Dataset.from_file(str(eval_path)) if eval_path is not None else None,
        collator=PadCollator(pad_token_id(tokenizer), packed=cfg.data.packing),
        report=report,
        template=template,
        end_of_turn_ids=end_of_turn_ids(tokenizer, template.family or "tokenizer")
        if template
        else end_of_turn_ids(tokenizer, "auto"),
        cache_path=str(entry.path),
        from_cache=from_cache,
        seconds=time.monotonic() - started,
    )
