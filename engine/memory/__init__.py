"""The memory-budget model: will this run fit on that GPU, term by term. Pure Python (no torch)."""

from engine.memory.advice import Advice, advise
from engine.memory.architectures import Architecture, find_architecture, resolve_architecture
from engine.memory.estimate import Estimate, Term, Verdict, choose_checkpointing, estimate, resolve_backend
from engine.memory.fit import FitResult, fit
from engine.memory.gpus import Gpu, gpu_catalog, resolve_gpu
from engine.memory.merge import MergeEstimate, MergePlacement, estimate_merge, place_merge

__all__ = [
    "Advice",
    "Architecture",
    "Estimate",
    "FitResult",
    "Gpu",
    "MergeEstimate",
    "MergePlacement",
    "Term",
    "Verdict",
    "advise",
    "choose_checkpointing",
    "estimate",
    "estimate_merge",
    "find_architecture",
    "fit",
    "gpu_catalog",
    "place_merge",
    "resolve_architecture",
    "resolve_backend",
    "resolve_gpu",
]
