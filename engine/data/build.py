"""Building a cache entry: a run's dataset, streamed from its source to packed Arrow rows on disk.

Memory stays bounded whatever the dataset's size: examples are read, normalized and encoded a
batch at a time (in worker processes when the source is large), and each batch's tokens go to a
scratch file at once. Only one number or two per example stay in memory (its length, its trained
token count). Then the validation split, the seq_len fit (truncate or drop, counted) and the
packing decide on those numbers alone, and the rows are written from the scratch files in batches.

The result is the same, bit for bit, as preparing everything in memory: the same examples in the
same order, the same split (random.Random(seed) over the example indices), the same best-fit
packing (engine/data/packing.py), the same counts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import RunConfig
from engine.data import cache
from engine.data.encoded import Encoded
from engine.data.errors import BadRecords, DataError
from engine.data.formats import Example, Normalizer, local_examples, normalized
from engine.data.masking import EncodedBatch, Encoder, EncoderSpec, encode_in_worker, init_worker
from engine.data.packing import bins
from engine.data.progress import Emit, Progress, stage
from engine.data.report import Figures, build_report
from engine.data.sources import Record, count_records, is_local
from engine.data.templates import ChatTemplate

BATCH_EXAMPLES = 256
ROWS_PER_WRITE = 512
# Below this much source data, worker processes cost more to start than they save.
WORKERS_FROM_BYTES = 16 << 20


def worker_count(source_bytes: int) -> int:
    """Tokenizing processes: QLC_DATA_WORKERS, else one per CPU this process may use (at most 8)
    for a large source, else none (encode in this process)."""
    env = os.environ.get("QLC_DATA_WORKERS", "").strip()
    if env.isdigit():
        return int(env)
    if source_bytes < WORKERS_FROM_BYTES:
        return 0
    return min(len(os.sched_getaffinity(0)), 8)


class TokenStore:
    """Every encoded example of one source, in order: tokens and labels in two scratch files,
    lengths and trained-token counts in memory."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self._ids = open(folder / "ids.bin", "wb")  # noqa: SIM115 - closed in finish()
        self._labels = open(folder / "labels.bin", "wb")  # noqa: SIM115
        self._where = open(folder / "where.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self._lengths: list[np.ndarray] = []
        self._trained: list[np.ndarray] = []
        self.chats = 0
        self.lengths = np.zeros(0, dtype=np.int64)
        self.trained = np.zeros(0, dtype=np.int64)
        self.starts = np.zeros(0, dtype=np.int64)
        self._fds: tuple[int, int] | None = None

    def add(self, batch: EncodedBatch) -> None:
        self._ids.write(batch.ids.astype(np.int32, copy=False).tobytes())
        self._labels.write(batch.labels.astype(np.int32, copy=False).tobytes())
        self._where.write("".join(json.dumps(w, ensure_ascii=False) + "\n" for w in batch.where))
        self._lengths.append(batch.lengths)
        self._trained.append(batch.trained)
        self.chats += batch.chats

    def finish(self) -> None:
        for f in (self._ids, self._labels, self._where):
            f.close()
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        self.trained = np.concatenate(self._trained) if self._trained else np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1])).astype(np.int64)
        self._lengths, self._trained = [], []
        # pread, not a memory map: pages read for packing stay in the page cache, not in this
        # process's resident memory.
        self._fds = (
            os.open(self.folder / "ids.bin", os.O_RDONLY),
            os.open(self.folder / "labels.bin", os.O_RDONLY),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, i: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i's ids and labels, cut to `limit` tokens."""
        assert self._fds is not None
        n = int(min(self.lengths[i], limit))
        offset = int(self.starts[i]) * 4
        ids = np.frombuffer(os.pread(self._fds[0], n * 4, offset), dtype=np.int32)
        labels = np.frombuffer(os.pread(self._fds[1], n * 4, offset), dtype=np.int32)
        return ids, labels

    def where(self, i: int) -> str:
        with (self.folder / "where.jsonl").open(encoding="utf-8") as f:
            for number, line in enumerate(f):
                if number == i:
                    return json.loads(line)
        return ""

    def close(self) -> None:
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        shutil.rmtree(self.folder, ignore_errors=True)


class RowWriter:
    """Rows (input_ids, labels[, seq_lengths]) to an Arrow IPC stream, as `datasets` writes its
    own files: `datasets.Dataset.from_file` memory-maps it. A packed row lists the lengths of its
    examples (`seq_lengths`, as TRL names them); the collator makes the position ids from them."""

    def __init__(self, path: Path, packed: bool) -> None:
        import pyarrow as pa

        self.pa = pa
        self.columns = ["input_ids", "labels", *(["seq_lengths"] if packed else [])]
        self.schema = pa.schema([(c, pa.list_(pa.int32())) for c in self.columns])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._rows: list[tuple[np.ndarray, ...]] = []
        self.rows = 0

    def add(self, *columns: np.ndarray) -> None:
        self._rows.append(columns)
        self.rows += 1
        if len(self._rows) >= ROWS_PER_WRITE:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        pa = self.pa
        arrays = []
        for c in range(len(self.columns)):
            lengths = np.fromiter((len(r[c]) for r in self._rows), dtype=np.int64, count=len(self._rows))
            offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
            values = pa.array(np.concatenate([r[c] for r in self._rows]).astype(np.int32, copy=False))
            arrays.append(pa.ListArray.from_arrays(offsets, values))
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()


def _seeded_choice(n: int, k: int, seed: int) -> list[int]:
    """k of range(n), chosen with `seed`: the same seed gives the same choice whatever the order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:k]


def held_out(n: int, fraction: float, seed: int, at_most: int | None = None) -> np.ndarray:
    """Which of n examples are held out for validation: a seeded, order-independent choice (both
    parts keep file order), `at_most` of them (data.val_max_examples)."""
    held = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 2:
        return held
    held[_seeded_choice(n, min(n - 1, max(1, round(n * fraction)), at_most or n), seed)] = True
    return held


def at_most(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of `limit` of n validation examples (a seeded choice, in file order); all without one."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.asarray(_seeded_choice(n, limit, seed), dtype=np.int64))


@dataclass
class Fit:
    """seq_len applied to a list of examples: which are kept, and what was cut or dropped."""

    keep: np.ndarray
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


def fit(lengths: np.ndarray, trained: np.ndarray, seq_len: int, too_long: str) -> Fit:
    """Truncate (counted) or drop what is longer than seq_len; drop what has no trained token
    left (a batch of those makes the loss 0/0). The first token is never a target. Each example
    is counted once: kept (and maybe truncated) or dropped."""
    over = lengths > seq_len
    if too_long == "drop":
        too, candidate, cut = over, ~over, np.zeros_like(over)
    else:
        too, candidate, cut = np.zeros_like(over), np.ones_like(over), over
    empty = candidate & (trained == 0)
    # Reasons in the order they first occur, as a sequential pass would meet them.
    firsts = {
        reason: int(np.argmax(mask))
        for reason, mask in (("too_long", too), ("no_trained_tokens", empty))
        if mask.any()
    }
    dropped = {
        reason: int(np.count_nonzero(too if reason == "too_long" else empty))
        for reason in sorted(firsts, key=firsts.__getitem__)
    }
    keep = candidate & ~empty
    # Truncated counts what is trained on, cut: an example truncation left without a trained
    # token is dropped, and counted there alone (it was in both columns of the report).
    kept_cut = cut & keep
    return Fit(
        keep=keep,
        truncated=int(np.count_nonzero(kept_cut)),
        truncated_tokens=int((lengths[kept_cut] - seq_len).sum()),
        dropped=dropped,
    )


def nothing_left_hint(lengths: np.ndarray, seq_len: int, too_long: str) -> str:
    """What to change when `fit` kept nothing: only what would help (data.too_long: truncate does
    not bring back an example whose answer starts past seq_len)."""
    over = lengths > seq_len
    if over.all() and too_long != "drop":
        return (
            f"raise train.seq_len: cut to {seq_len} tokens, no example keeps a token of its answer; "
            f"the shortest example is {int(lengths.min())} tokens"
        )
    if over.any() and too_long == "drop":
        return "raise train.seq_len or set data.too_long: truncate"
    return "the examples that fit have no answer to train on: check data.format and data.columns"


class Build:
    """One build of a cache entry into `folder` (see cache.py)."""

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: Any,
        spec: EncoderSpec,
        template: ChatTemplate | None,
        folder: Path,
        emit: Emit | None,
        hub: dict[str, Any],
        workers: int | None = None,
    ) -> None:
        self.cfg, self.tokenizer, self.spec, self.template = cfg, tokenizer, spec, template
        self.folder, self.emit, self.hub, self.workers = folder, emit, hub, workers
        self.format: str | None = None
        self.bad = BadRecords(cfg.data.bad_records)

    # -- reading -------------------------------------------------------------------------------

    def _read(
        self, source: str, split: str | None, normalize: Normalizer
    ) -> Iterator[tuple[Record, Example]]:
        """Each record of the source with its example; bad ones go to self.bad (stop or skip)."""
        if is_local(source):
            return local_examples(source, normalize, self.bad)
        from engine.data.hub import hub_records

        split = split or self.cfg.data.split
        return normalized(hub_records(self.hub[(source, split)], source, split), normalize, self.bad)

    def _examples(
        self, source: str, split: str | None, limit: int | None, progress: Progress, size: int
    ) -> tuple[Iterator[list[Example]], Normalizer]:
        d = self.cfg.data
        normalize = Normalizer(d.format, d.columns, d.system_prompt)
        # A JSON array or a CSV file has no cheap record count: estimate one from the bytes the
        # records read so far take (every 64th one measured), for the progress's total and ETA.
        estimating = not progress.total and size > 0
        sampled_bytes = sampled = 0

        def batches() -> Iterator[list[Example]]:
            nonlocal sampled_bytes, sampled
            batch: list[Example] = []
            # data.max_examples counts examples (a skipped bad record is none), and no record past
            # the limit is read (a broken one there would stop a run that never uses it).
            for count, (record, example) in enumerate(self._read(source, split, normalize)):
                batch.append(example)
                if estimating and count % 64 == 0:
                    sampled_bytes += len(json.dumps(record.row, ensure_ascii=False, default=str).encode()) + 2
                    sampled += 1
                if len(batch) == BATCH_EXAMPLES:
                    if estimating:
                        guess = int(size / (sampled_bytes / sampled))
                        progress.total = (
                            max(guess, count + 1) if limit is None else min(max(guess, count + 1), limit)
                        )
                    yield batch
                    batch = []
                if limit is not None and normalize.normalized >= limit:
                    break
            if batch:
                yield batch

        return batches(), normalize

    def _estimate(self, source: str, split: str | None, limit: int | None) -> tuple[int, int]:
        """(records, bytes) of a source, as far as known cheaply: for progress and the worker count."""
        if is_local(source):
            from engine.data.sources import local_bytes

            total, size = count_records(source), local_bytes(source)
        else:
            dataset = self.hub[(source, split or self.cfg.data.split)]
            total, size = len(dataset), int(getattr(getattr(dataset, "data", None), "nbytes", 0) or 0)
        if limit is not None:
            total = min(total, limit) if total else limit
        return total, size

    # -- encoding ------------------------------------------------------------------------------

    def encode_source(
        self, source: str, name: str, split: str | None, limit: int | None
    ) -> tuple[TokenStore, str | None]:
        skipped_before = self.bad.count
        total, size = self._estimate(source, split, limit)
        workers = self.workers if self.workers is not None else worker_count(size)
        if self.spec.backend_json is None:
            workers = 0  # a slow tokenizer lives only in this process
        store = TokenStore(self.folder / f"scratch-{name}")
        progress = Progress(self.emit, f"tokenizing {source}", total=total)
        batches, normalize = self._examples(source, split, limit, progress, size)
        try:
            if workers > 0:
                self._encode_in_pool(batches, store, progress, workers)
            else:
                encoder = Encoder(self.spec, self.tokenizer)
                for batch in batches:
                    store.add(encoder.encode(batch))
                    progress.advance(len(batch))
        except BaseException:
            store.finish()
            store.close()
            raise
        store.finish()
        progress.done()
        try:
            self.bad.verdict(source, len(store), skipped_before)
        except DataError:
            store.close()
            raise
        return store, normalize.format

    def _encode_in_pool(
        self, batches: Iterator[list[Example]], store: TokenStore, progress: Progress, workers: int
    ) -> None:
        import multiprocessing
        from concurrent.futures import Future, ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # spawn: a fresh interpreter per worker, nothing inherited from a process that may hold a
        # model, CUDA state and threads. A worker that dies (killed, out of memory) breaks the pool
        # and fails this preparation, instead of leaving it waiting for a batch that never comes.
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=init_worker,
            initargs=(self.spec,),
        )
        pending: deque[Future[EncodedBatch]] = deque()

        def collect() -> None:
            batch = pending.popleft().result()
            store.add(batch)
            progress.advance(len(batch.lengths))

        try:
            for batch in batches:
                pending.append(pool.submit(encode_in_worker, batch))
                while len(pending) > 2 * workers:
                    collect()
            while pending:
                collect()
        except BrokenProcessPool:
            raise RuntimeError("a tokenizing worker process died (killed, or out of memory?)") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- rows ----------------------------------------------------------------------------------

    def write_rows(self, store: TokenStore, members: np.ndarray, path: Path, label: str) -> int:
        """Rows of the examples `members` (indices into the store, in order) to `path`; packed or
        one example a row. Returns the number of rows."""
        seq_len, packed = self.cfg.train.seq_len, self.cfg.data.packing
        lengths = np.minimum(store.lengths[members], seq_len)
        groups = bins(lengths.tolist(), seq_len) if packed else None
        total = len(groups) if groups is not None else len(members)
        if packed:
            stage(
                self.emit,
                f"packing {len(members):,} {label} examples into {total:,} rows of {seq_len:,} tokens",
            )
        progress = Progress(self.emit, f"writing {label} rows", total=total, unit="rows")
        writer = RowWriter(path, packed)
        try:
            if groups is None:
                for i in members.tolist():
                    writer.add(*store.read(i, seq_len))
                    progress.advance(1)
            else:
                for group in groups:
                    parts = [store.read(int(members[j]), seq_len) for j in group]
                    writer.add(
                        np.concatenate([ids for ids, _ in parts]),
                        np.concatenate([labels for _, labels in parts]),
                        np.fromiter((len(ids) for ids, _ in parts), dtype=np.int32, count=len(parts)),
                    )
                    progress.advance(1)
        finally:
            writer.close()
        progress.done()
        return writer.rows

    # -- the whole build -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        d, seq_len = self.cfg.data, self.cfg.train.seq_len
        train_store, fmt = self.encode_source(d.source, "train", None, d.max_examples)
        stores = [train_store]
        try:
            if d.val_source:
                split = "validation" if d.val_source == d.source else None
                held_store, _ = self.encode_source(d.val_source, "eval", split, None)
                stores.append(held_store)
                train_idx = np.arange(len(train_store))
                eval_idx = at_most(len(held_store), d.val_max_examples, d.shuffle_seed)
            else:
                held_store = train_store
                held = held_out(len(train_store), d.val_fraction, d.shuffle_seed, d.val_max_examples)
                train_idx, eval_idx = np.flatnonzero(~held), np.flatnonzero(held)

            train_fit = fit(
                train_store.lengths[train_idx], train_store.trained[train_idx], seq_len, d.too_long
            )
            eval_fit = fit(held_store.lengths[eval_idx], held_store.trained[eval_idx], seq_len, d.too_long)
            kept, kept_eval = train_idx[train_fit.keep], eval_idx[eval_fit.keep]
            if not len(kept):
                reasons = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in train_fit.dropped.items())
                raise DataError(
                    f"{d.source}: no training example left after fitting to seq_len {seq_len} ({reasons})",
                    nothing_left_hint(train_store.lengths[train_idx], seq_len, d.too_long),
                )
            rows = self.write_rows(train_store, kept, self.folder / cache.TRAIN, "training")
            if len(kept_eval):
                self.write_rows(held_store, kept_eval, self.folder / cache.EVAL, "validation")

            first_ids, first_labels = train_store.read(int(kept[0]), seq_len)
            first = Encoded(train_store.where(int(kept[0])), first_ids.tolist(), first_labels.tolist())
            template_used = any(s.chats for s in stores)
            figures = Figures(
                lengths=np.sort(train_store.lengths[train_idx]).tolist(),
                examples=len(kept),
                eval_examples=len(kept_eval),
                rows=rows,
                truncated=train_fit.truncated,
                truncated_tokens=train_fit.truncated_tokens,
                dropped=train_fit.dropped,
                tokens=int(np.minimum(train_store.lengths[kept], seq_len).sum()),
                trained_tokens=int(train_store.trained[kept].sum()),
                first=first,
                skipped=self.bad.count,
                skipped_first=self.bad.first,
            )
            template = self.template if template_used else None
            report = build_report(self.cfg, self.tokenizer, template, fmt, figures)
        finally:
            for store in stores:
                store.close()
        return {"report": report.to_dict(), "format": fmt, "template_used": template_used}
