"""Memory per GPU before renting GPUs: from a model's config and files alone, per rank, for every strategy."""

from .plan import DEVICES, Plan, PlanOptions, PlanRequest, build_meta_model, plan_memory
from .storage import StoredWeights, stored_weights

__all__ = [
    "DEVICES",
    "Plan",
    "PlanOptions",
    "PlanRequest",
    "StoredWeights",
    "build_meta_model",
    "plan_memory",
    "stored_weights",
]
