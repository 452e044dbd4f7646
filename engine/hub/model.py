"""Hub models: the files a run loads (engine/hub/files.py), fetched with progress into the local hub
cache. The loaders then read the snapshot folder: a local path, so transformers (and Unsloth) make
no network call of their own and load exactly the commit that was fetched."""

from __future__ import annotations

import json
from collections.abc import Callable

from engine import protocol
from engine.hub.cache import Select, Snapshot
from engine.hub.fetch import fetch
from engine.hub.files import model_files, weights_index

WHERE = "model.name_or_path"


def selector(repo: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> Select:
    def select(names: list[str], read: Callable[[str], bytes]) -> list[str]:
        index_name = weights_index(names, allow_pickle)
        index = json.loads(read(index_name)) if index_name else None
        return model_files(
            names, repo=repo, index=index, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )

    return select


def fetch_model(
    repo: str,
    revision: str | None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    emit: Callable[[protocol.Event], None] | None = None,
    refresh: bool = False,
    where: str = WHERE,
) -> Snapshot:
    return fetch(
        repo,
        "model",
        revision,
        selector(repo, trust_remote_code, allow_pickle),
        where=where,
        emit=emit,
        refresh=refresh,
    )
