"""qlora-console's engine: headless QLoRA training in a child process, streamed as protocol events.

    protocol.py  config.py  errors.py   the vocabulary the console and the engine share
    stacks.py    the training stacks (hf, unsloth) as facts, and the `auto` rule
    allocator.py the CUDA allocator settings a run uses (read by the memory model too)
    run/      the run lifecycle: run directories, launching, checkpoints, events (pure Python)
    memory/   the memory-budget model (pure Python)
    data/     datasets: sources, formats, templates, masking, packing, the data report
    models/   the base model: the built-in demo model, the pre-flight check of a model's path
    train/    the child's training: recipe, backends, sampling (torch)
    export/   merge an adapter into its base, check it, write a model card

Never imports textual or rich. The console imports only the pure parts; everything that needs
torch runs in an engine process (docs/architecture.md; the contracts in pyproject.toml).
"""

__version__ = "0.1.0"
