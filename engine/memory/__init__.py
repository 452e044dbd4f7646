"""The memory-budget model: will this run fit on that GPU, term by term. Pure Python (no torch).

The face the console reads: `estimate`, `advise` and `fit` for one GPU, `per_gpu` (the module of
per-GPU estimates for several), the merge estimate of an export, the checkpointing plan a run
hands its backend, and the GPU and architecture catalogs.
"""

from engine.memory import distributed as per_gpu
from engine.memory.advice import Advice, advise
from engine.memory.architectures import (
    Architecture,
    by_hub_id,
    catalog,
    find_architecture,
    resolve_architecture,
)
from engine.memory.checkpointing import CheckpointPlan, plan_checkpointing
from engine.memory.estimate import (
    DOES_NOT_FIT,
    FITS,
    TERM_NAMES,
    TIGHT,
    Estimate,
    StepForecast,
    Term,
    Verdict,
    choose_checkpointing,
    estimate,
    forecast_step,
    resolve_backend,
)
from engine.memory.fit import FitResult, fit
from engine.memory.flops import training_flops_per_token, utilisation
from engine.memory.gpus import Gpu, gpu_catalog, resolve_gpu
from engine.memory.merge import SHARD_DEFAULT, MergeEstimate, MergePlacement, estimate_merge, place_merge

__all__ = [
    "DOES_NOT_FIT",
    "FITS",
    "SHARD_DEFAULT",
    "TERM_NAMES",
    "TIGHT",
    "Advice",
    "Architecture",
    "CheckpointPlan",
    "Estimate",
    "FitResult",
    "Gpu",
    "MergeEstimate",
    "MergePlacement",
    "StepForecast",
    "Term",
    "Verdict",
    "advise",
    "by_hub_id",
    "catalog",
    "choose_checkpointing",
    "estimate",
    "estimate_merge",
    "find_architecture",
    "fit",
    "forecast_step",
    "gpu_catalog",
    "per_gpu",
    "place_merge",
    "plan_checkpointing",
    "resolve_architecture",
    "resolve_backend",
    "resolve_gpu",
    "training_flops_per_token",
    "utilisation",
]
