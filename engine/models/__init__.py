"""The base model a run names: the built-in demo model (tiny.py: what it is; tiny_build.py: built
on first use, engine processes only), the pre-flight check of a model's name or path (source.py)
and the loaders the engine's processes share (loading.py)."""

from engine.models.source import check as check_source
from engine.models.tiny import BUILTIN_PREFIX, is_builtin

__all__ = ["BUILTIN_PREFIX", "check_source", "is_builtin"]
