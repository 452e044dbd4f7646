"""Export a run: merge its adapter into the 16-bit base (or copy the adapter alone), check the
result, write a model card, and optionally convert it to GGUF with llama.cpp.

    request.py  what to export and where: checked before anything loads (pure Python)
    card.py     the model card, README.md, from the run's config and events (pure Python)
    gguf.py     finding llama.cpp's converter and running it (pure Python + subprocess)
    merge.py    base in 16-bit + adapter -> merged, saved, reloaded and compared (torch)
    job.py      the engine's `export` mode: the steps above as progress events

Only request, card and gguf are imported by the console; merge runs in an engine process.
"""
