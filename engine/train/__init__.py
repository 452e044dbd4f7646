"""Training, in the engine child only (torch, transformers, peft, trl, bitsandbytes).

    recipe.py             one run: setup, train, save, cleanup (`run` is the child's entry)
    backends/             one file per training stack (hf, unsloth) behind one protocol
    collectives.py        what the ranks of a multi-process run tell each other
    sampling.py           generate from the live model or a checkpoint
    sample_checkpoint.py  the engine's `sample` mode: base + a saved adapter
    failures.py           failures a run reports as one structured error
    faults.py             fault injection for the reliability tests ($QLC_FAULT)

Nothing outside the engine imports this package (an import-linter contract in pyproject.toml).
"""
