"""The base model a run names: the built-in demo model (tiny.py) and the pre-flight check of
a model's name or path (source.py)."""
