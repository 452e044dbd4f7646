"""qlora-console's engine: headless QLoRA training in a child process, streamed as protocol events.

Never imports textual or rich. Its pure-Python parts (protocol, config, memory, runs, launcher)
are what the console may import; everything that needs torch runs in an engine process.
"""

__version__ = "0.1.0"
