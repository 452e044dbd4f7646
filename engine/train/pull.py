"""`python -m engine pull`: fetch what a pull request names (engine.run.pull builds it) into the
local hub cache, with the download progress a run shows."""

from __future__ import annotations

import os

from engine import __version__, protocol
from engine.run.events import Emitter
from engine.run.pull import PullRequest


def run(request: PullRequest, emitter: Emitter) -> int:
    """Fetch everything the request names; 0 when all of it is in the cache afterwards."""
    from engine.hub import cache
    from engine.hub.dataset import fetch_dataset
    from engine.hub.model import fetch_model
    from engine.train.sources import fetch_logged

    emit = emitter.emit
    emit(protocol.Hello(engine_version=__version__, pid=os.getpid(), mode="pull"))
    if cache.offline():
        emit(protocol.Log(message="HF_HUB_OFFLINE is set: checking the local cache only"))
    for m in request.models:
        fetch_logged(
            lambda watch, m=m: fetch_model(
                m.repo,
                m.revision,
                trust_remote_code=m.trust_remote_code,
                allow_pickle=m.allow_pickle,
                emit=watch,
                refresh=True,
            ),
            emit,
        )
    for d in request.datasets:
        fetch_logged(
            lambda watch, d=d: fetch_dataset(
                d.repo, d.subset, d.split, d.revision, where=d.where, emit=watch, refresh=True
            ),
            emit,
        )
    return 0
