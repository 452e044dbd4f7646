"""Hub sources: model and dataset repos downloaded with progress, and the commits a run is pinned to.

    files.py     which files of a repo a run needs (weights as safetensors, config, tokenizer, ...)
    progress.py  byte progress over a download, as `downloading` stage events
    fetch.py     resolve a revision to a commit and download the files, resumably (huggingface_hub)
    cache.py     what is already in the local hub cache, read without a network call
    errors.py    the hub's refusals (401, 403, 404, no network) as one-line errors
    dataset.py   a hub dataset's data files for one subset and split, loaded from the local snapshot
    pins.py      RUN_DIR/sources.json: the commits a run started from, which a resume reuses
    sources.py   what a run does at start and on resume: fetch, pin, hand the loaders local folders
    pull.py      `python -m engine pull`: the same downloads ahead of time (`qlc pull`)

files.py and pins.py are pure Python (the console may import them); the rest runs in engine
processes only.
"""
