"""Branch-Train: how a training budget is split between the shared seed and its specialists.

Following Branch-Train-Merge (Li et al. 2022) and c-BTM (Gururangan et al. 2023), a specialist
is not trained from scratch on its own small domain: a **seed** model is trained on the pooled
corpus first, and each specialist is born by branching from it and training on its own domain.
The seed is senmon's generalist, the model `auto` falls back to.

The budget is what a generalist of the same shape would get: `epochs` passes over the pooled
training data, `total_steps` optimizer steps. The seed takes `seed_fraction` of it; the rest is
shared equally by the specialists, so the seed plus every branch cost the same FLOPs as that one
generalist. A specialist added later branches from the same seed for one branch's steps: adding
a domain costs one branch, not a retrain of everything.

The shape is chosen once, for the seed and its branches together, by the compute-optimal rule
on what one specialist sees in its life: the seed's tokens plus its own branch's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .loop import Schedule


# The seed's learning rate at its end, as a share of the peak: 'cosine' decays it; 'constant' keeps it
# (warmup-stable-decay), leaving the decay to each branch on its own domain.
SEED_FLOOR = {"cosine": 0.1, "constant": 1.0}


@dataclass(frozen=True)
class BranchPlan:
    tokens_per_step: int
    total_steps: int          # the budget: what a same-shape generalist would train
    seed_steps: int
    branch_steps: int         # each specialist's own steps after branching
    specialists: int
    seed_fraction: float

    @property
    def lifetime_tokens(self) -> int:
        """Tokens one specialist has seen: the seed's, then its branch's (what sizing counts)."""
        return (self.seed_steps + self.branch_steps) * self.tokens_per_step

    def as_record(self) -> dict:
        return {**asdict(self), "lifetime_tokens": self.lifetime_tokens}


def plan_budget(pooled_blocks: int, epochs: int, global_batch: int, seq_len: int, seed_fraction: float,
                specialists: int) -> BranchPlan:
    """The split of `epochs` passes over `pooled_blocks` blocks (see the module docstring)."""
    if not 0 < seed_fraction < 1:
        raise ValueError(f"seed_fraction must be between 0 and 1, not {seed_fraction}")
    total = (pooled_blocks // global_batch) * epochs
    seed = max(1, round(total * seed_fraction))
    branch = max(1, round((total - seed) / max(1, specialists)))
    return BranchPlan(global_batch * seq_len, total, seed, branch, specialists, seed_fraction)


def branch_schedule(steps: int, peak_lr: float, learning_rate_scale: float, warmup_fraction: float) -> Schedule:
    """A branch re-warms to a fraction of the seed's peak learning rate, then decays (cosine)."""
    return Schedule(steps=steps, peak_lr=peak_lr * learning_rate_scale, warmup_fraction=warmup_fraction)
