"""Dataset formats -> one normalized `Example`, validated row by row.

alpaca    {instruction, input?, output, system?}
messages  {messages: [{role, content}, ...]}            (OpenAI chat format)
sharegpt  {conversations: [{from, value}, ...]}         (human/gpt roles)
text      {text}                                        (continued pretraining: every token trained)
tokens    {input_ids, labels?}                          (already tokenized; labels default to input_ids)

`data.columns` maps a format's names to the dataset's own (`{instruction: question}`), including the
inner keys of a conversation (`{role: speaker, content: text}`). Pure Python, like sources.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from engine.data.errors import BadRecords, DataError, FormatError, at
from engine.data.sources import Record, read_local

FORMATS = ("alpaca", "messages", "sharegpt", "text", "tokens")
COLUMNS_HINT = (
    "set data.format (auto, alpaca, messages, sharegpt, text, tokens) and map names with data.columns"
)

# Role names seen in the wild, mapped to the three a chat template knows.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


@dataclass
class Example:
    """One training example. Exactly one of messages / text / input_ids is set."""

    where: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None
    # Assistant messages not to train on, by their order among the assistant messages (0 = the
    # first): OpenAI's fine-tuning format marks them with "weight": 0.
    untrained: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        if self.messages is not None:
            return "chat"
        return "text" if self.text is not None else "tokens"


def detect(record: Record, columns: dict[str, str]) -> str:
    row = record.row

    def has(key: str) -> bool:
        return columns.get(key, key) in row

    if has("input_ids"):
        return "tokens"
    for key in ("messages", "conversations"):
        if has(key):
            turns = _maybe_json(row[columns.get(key, key)])
            first = turns[0] if isinstance(turns, list) and turns else None
            if isinstance(first, dict) and columns.get("from", "from") in first:
                return "sharegpt"
            return "messages"
    if has("instruction") or has("output"):
        return "alpaca"
    if has("text"):
        return "text"
    single = single_message(record, columns)
    if single:
        raise at(record.where, single, ONE_CONVERSATION_HINT)
    fields = ", ".join(sorted(map(str, row))) or "none"
    raise at(record.where, f"cannot tell the dataset format from its fields ({fields})", COLUMNS_HINT)


ONE_CONVERSATION_HINT = (
    'each record must hold a whole conversation: {"messages": [{"role": ..., "content": ...}, ...]}'
)


def single_message(record: Record, columns: dict[str, str]) -> str | None:
    """A record that is one chat message instead of a conversation (a conversation exploded into
    one line per message): the problem, said as such."""
    row = record.row
    for role, content in (("role", "content"), ("from", "value")):
        if columns.get(role, role) in row and columns.get(content, content) in row:
            keys = ", ".join(sorted(map(str, row)))
            return f"malformed record: it holds one message ({keys}), not a whole conversation"
    return None


def looks_like(record: Record, columns: dict[str, str]) -> str | None:
    """The format a record looks like, or None when it looks like none."""
    try:
        return detect(record, columns)
    except DataError:
        return None


class Normalizer:
    """Turns records of one source into Examples. With format "auto" the first record decides.

    A record that does not fit is explained by what it looks like: a pinned format that does not
    match the data names the format it seems to be, and a folder whose files differ in shape is
    called mixed, naming a file of each shape."""

    def __init__(self, fmt: str, columns: dict[str, str], system_prompt: str | None = None) -> None:
        self.pinned = fmt != "auto"
        self.format: str | None = None if fmt == "auto" else fmt
        self.columns = columns
        self.system_prompt = system_prompt
        self.decided_by = ""
        """The file whose first record decided the format ("auto")."""
        self.decided_at = ""
        """That record: FILE: line N."""
        self.normalized = 0

    def __call__(self, record: Record) -> Example:
        if self.format is None:
            self.format = detect(record, self.columns)
            self.decided_by, self.decided_at = record.file, record.where
        try:
            example = self._normalize(record)
        except DataError as exc:
            raise self._explain(record, exc) from None
        self.normalized += 1
        return example

    def _missing_hint(self) -> str:
        """A record that lacks a field earlier records had is the record's fault, not the format's."""
        if self.normalized:
            return "fix or remove this record: the records before it have the field"
        return f"{self.format} format; {COLUMNS_HINT}"

    def _explain(self, record: Record, exc: DataError) -> DataError:
        looks = looks_like(record, self.columns)
        if looks is None or looks == self.format:
            single = single_message(record, self.columns)
            return at(record.where, single, ONE_CONVERSATION_HINT) if single else exc
        if self.pinned:
            # One such record among many is a bad record (data.bad_records: skip leaves it out);
            # a pinned format most records do not have stops at the source's verdict.
            return DataError(
                f"{exc.message}; the record looks like {looks}, not {self.format}",
                f"set data.format: {looks} (or auto)",
            )
        if record.file and self.decided_by and record.file != self.decided_by:
            return FormatError(
                f"{record.where}: mixed formats: {self.decided_by} holds {self.format} records, "
                f"{record.file} holds {looks} records",
                "use one format per dataset: convert the files, or point data.source at files of one shape",
            )
        first = (
            self.decided_at.removeprefix(f"{record.file}: ")
            if record.file == self.decided_by
            else self.decided_at
        )
        return FormatError(
            f"{exc.message}; the record looks like {looks}, while the first record read "
            f"({first}) was {self.format}, which decided the format",
            f"fix or remove that record, or set data.format: {looks} (then data.bad_records: skip "
            "can leave out records of another format)",
        )

    def _normalize(self, record: Record) -> Example:
        if self.format == "alpaca":
            return self._alpaca(record)
        if self.format in ("messages", "sharegpt"):
            return self._conversation(record)
        if self.format == "text":
            return Example(record.where, text=self._text(record, "text"))
        return self._tokens(record)

    # -- fields ------------------------------------------------------------------------------

    def _label(self, key: str) -> str:
        col = self.columns.get(key, key)
        return f"{col!r}" if col == key else f"{col!r} (data.columns maps it to {key})"

    def _text(self, record: Record, key: str, required: bool = True) -> str:
        col = self.columns.get(key, key)
        value = record.row.get(col)
        if value is None:
            if required:
                raise at(record.where, f"missing field {self._label(key)}", self._missing_hint())
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise at(record.where, f"field {self._label(key)} must be text, got {type(value).__name__}")
        if required and not value.strip():
            raise at(record.where, f"field {self._label(key)} is empty")
        return value

    def _with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    # -- formats -----------------------------------------------------------------------------

    def _alpaca(self, record: Record) -> Example:
        instruction = self._text(record, "instruction")
        extra = self._text(record, "input", required=False)
        output = self._text(record, "output")
        system = self._text(record, "system", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return Example(record.where, messages=self._with_system(messages))

    def _conversation(self, record: Record) -> Example:
        sharegpt = self.format == "sharegpt"
        names = ("conversations", "messages") if sharegpt else ("messages", "conversations")
        key = next((k for k in names if self.columns.get(k, k) in record.row), names[0])
        turns = _maybe_json(record.row.get(self.columns.get(key, key)))
        if turns is None:
            raise at(record.where, f"missing field {self._label(key)}", self._missing_hint())
        if not isinstance(turns, list) or not turns:
            raise at(record.where, f"field {self._label(key)} must be a non-empty list of turns")
        role_key = self.columns.get("from" if sharegpt else "role", "from" if sharegpt else "role")
        content_key = self.columns.get("value" if sharegpt else "content", "value" if sharegpt else "content")
        messages: list[dict[str, str]] = []
        untrained: list[int] = []
        for number, turn in enumerate(turns, 1):
            here = f"message {number}"
            if not isinstance(turn, dict):
                raise at(record.where, f"{here} must be an object with {role_key!r} and {content_key!r}")
            raw_role = turn.get(role_key)
            role = ROLES.get(str(raw_role).lower()) if raw_role is not None else None
            if raw_role is None:
                raise at(record.where, f"{here} has no {role_key!r}")
            if role is None:
                raise at(
                    record.where,
                    f"{here} has role {raw_role!r}; supported: system, user, assistant (or human, gpt)",
                )
            content = turn.get(content_key)
            if content is None:
                raise at(record.where, f"{here} ({role}) has no {content_key!r}")
            if not isinstance(content, str):
                raise at(record.where, f"{here} ({role}) content must be text, got {type(content).__name__}")
            if role == "system":
                if number != 1:
                    raise at(record.where, f"{here} is a system message; only the first message may be one")
                if not content.strip():
                    continue  # an empty system prompt says nothing; rendering it would only add noise
            elif not content.strip():
                raise at(record.where, f"{here} ({role}) is empty")
            if "weight" in turn:
                weight = turn["weight"]
                if role != "assistant" or weight not in (0, 1) or isinstance(weight, bool):
                    raise at(
                        record.where,
                        f"{here} ({role}) has weight {weight!r}: only assistant messages take one, 0 or 1",
                        "weight 0 leaves an answer out of training (OpenAI's fine-tuning format)",
                    )
                if weight == 0:
                    untrained.append(sum(m["role"] == "assistant" for m in messages))
            messages.append({"role": role, "content": content})
        _check_alternation(
            record.where, messages, first_number=2 if turns and _is_system(turns[0], role_key) else 1
        )
        answers = sum(m["role"] == "assistant" for m in messages)
        if len(untrained) == answers:
            raise at(record.where, "every assistant message has weight 0: nothing to train on")
        # A last user turn has no answer to learn: it would only cost tokens (and memory).
        if messages[-1]["role"] == "user":
            messages.pop()
        return Example(record.where, messages=self._with_system(messages), untrained=tuple(untrained))

    def _tokens(self, record: Record) -> Example:
        ids = _int_list(
            record,
            self._label("input_ids"),
            _maybe_json(record.row.get(self.columns.get("input_ids", "input_ids"))),
        )
        if ids is None:
            raise at(record.where, f"missing field {self._label('input_ids')}", COLUMNS_HINT)
        if not ids:
            raise at(record.where, f"field {self._label('input_ids')} is empty")
        if any(i < 0 for i in ids):
            raise at(record.where, f"field {self._label('input_ids')} holds a negative token id")
        labels = _int_list(
            record, self._label("labels"), _maybe_json(record.row.get(self.columns.get("labels", "labels")))
        )
        if labels is not None and len(labels) != len(ids):
            raise at(record.where, f"labels has {len(labels)} entries but input_ids has {len(ids)}")
        return Example(record.where, input_ids=ids, labels=labels)


def _is_system(turn: Any, role_key: str) -> bool:
    return isinstance(turn, dict) and str(turn.get(role_key, "")).lower() == "system"


def _check_alternation(where: str, messages: list[dict[str, str]], first_number: int) -> None:
    """After an optional system message: user, assistant, user, assistant, ... with an answer."""
    turns = [m for m in messages if m["role"] != "system"]
    expected, previous = "user", None
    for offset, message in enumerate(turns):
        number = first_number + offset
        if message["role"] != expected:
            if previous is None:
                raise at(
                    where,
                    f"message {number} is {message['role']}; a conversation must start with a user message",
                )
            raise at(
                where,
                f"message {number} is {message['role']} after {previous}; roles must alternate user/assistant",
            )
        previous = expected
        expected = "assistant" if expected == "user" else "user"
    if not any(m["role"] == "assistant" for m in turns):
        raise at(where, "the conversation has no assistant message: nothing to train on")


def _maybe_json(value: Any) -> Any:
    """CSV cells hold nested data as JSON text; parse it when it looks like a list."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _int_list(record: Record, label: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise at(record.where, f"field {label} must be a list of integers")
    return value


def normalized(
    records: Iterable[Record], normalize: Normalizer, bad: BadRecords
) -> Iterator[tuple[Record, Example]]:
    """Each record with its example; a record that does not fit goes to `bad` (stop or skip)."""
    for record in records:
        try:
            example = normalize(record)
        except DataError as error:
            bad(error, normalize.normalized > 0)
            continue
        yield record, example


def local_examples(source: str, normalize: Normalizer, bad: BadRecords) -> Iterator[tuple[Record, Example]]:
    """`normalized` over a local source: a line that cannot be read goes to `bad` too."""
    return normalized(read_local(source, lambda error: bad(error, normalize.normalized > 0)), normalize, bad)
