"""What `qlc pull` asks for: a model and hub datasets to download ahead of time, as a run would (the
same files, the same progress events), asking the hub for the newest commit of each branch even
when an older one is cached.

The request is built by the console from a preset or a model id (`request_for`, pure Python); the
downloads run in an engine process (`python -m engine pull --request JSON`, engine.train.pull):
the console never imports huggingface_hub's client.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from engine.config import RunConfig
from engine.errors import UserError


@dataclass
class ModelPull:
    repo: str
    revision: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass
class DatasetPull:
    repo: str
    split: str
    subset: str | None = None
    revision: str | None = None
    where: str = "data.source"


@dataclass
class PullRequest:
    models: list[ModelPull] = field(default_factory=list)
    datasets: list[DatasetPull] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PullRequest:
        try:
            data = json.loads(text)
            return cls(
                models=[ModelPull(**m) for m in data.get("models", [])],
                datasets=[DatasetPull(**d) for d in data.get("datasets", [])],
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise UserError(f"--request: not a pull request ({exc})") from None

    @property
    def empty(self) -> bool:
        return not self.models and not self.datasets


def request_for(cfg: RunConfig) -> PullRequest:
    """What a run of `cfg` downloads: its model and hub datasets (none for local ones)."""
    from engine.data.sources import is_local
    from engine.models.source import is_hub_model

    request = PullRequest()
    m = cfg.model
    if is_hub_model(m.name_or_path):
        request.models.append(ModelPull(m.name_or_path, m.revision, m.trust_remote_code, m.allow_pickle))
    d = cfg.data
    if d.source and not is_local(d.source):
        request.datasets.append(DatasetPull(d.source, d.split, d.subset, d.revision))
    if d.val_source and not is_local(d.val_source):
        same = d.val_source == d.source
        request.datasets.append(
            DatasetPull(
                d.val_source,
                "validation" if same else d.split,
                d.subset,
                d.revision if same else d.val_revision,
                "data.val_source",
            )
        )
    return request
