"""Branch-Train: the budget split (pure arithmetic), the schedule, and the benchmark's quick run.

The Ray Train path (seed, then a branch, registered and gated) is tested in tests/test_train.py."""

from __future__ import annotations

import pytest

from senmon.train.branch import branch_schedule, plan_budget
from senmon.train.loop import Schedule, repeat_epochs


def test_the_seed_and_its_branches_share_one_generalists_budget():
    plan = plan_budget(pooled_blocks=1000, epochs=3, global_batch=8, seq_len=256, seed_fraction=0.75, specialists=5)
    assert plan.total_steps == (1000 // 8) * 3 == 375
    assert plan.seed_steps == 281 and plan.branch_steps == 19  # round(375 * 0.75), round(94 / 5)
    assert abs(plan.seed_steps + 5 * plan.branch_steps - plan.total_steps) <= 5  # equal FLOPs up to rounding
    assert plan.tokens_per_step == 8 * 256
    assert plan.lifetime_tokens == (281 + 19) * 2048  # what the sizing rule counts for one specialist
    assert plan.as_record()["lifetime_tokens"] == plan.lifetime_tokens
    with pytest.raises(ValueError, match="between 0 and 1"):
        plan_budget(1000, 1, 8, 256, 1.0, 5)


def test_a_branch_rewarms_to_a_lower_peak_and_decays():
    schedule = branch_schedule(steps=100, peak_lr=3e-3, learning_rate_scale=0.5, warmup_fraction=0.1)
    assert schedule == Schedule(steps=100, peak_lr=1.5e-3, warmup_fraction=0.1)
    rates = [schedule.lr(step) for step in range(100)]
    assert rates[0] == pytest.approx(1.5e-4) and max(rates) == pytest.approx(1.5e-3)
    assert rates.index(max(rates)) == 9 and rates[-1] < rates[50] < rates[10]
    assert rates[-1] >= 0.1 * 1.5e-3  # the cosine floor


def test_runs_need_not_be_a_whole_number_of_epochs():
    batches = repeat_epochs(lambda epoch: iter([(epoch, 0), (epoch, 1)]))
    assert [next(batches) for _ in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert list(repeat_epochs(lambda epoch: iter([]))) == []


@pytest.mark.slow
def test_the_specialists_benchmark_runs_every_arm_at_equal_flops():
    """`python -m bench specialists --quick`: the benchmark's own code at tiny sizes (2 seeds, 1 budget)."""
    from bench.specialists import DOMAINS, main

    result = main(["--quick"])
    [setting] = result["settings"]
    cost = setting["cost"]
    assert set(cost) == {"a", "b", "b'", "c", "d"}
    for arm in ("a", "b'", "c", "d"):  # every arm spends the same training FLOPs as (b), within 5%
        assert abs(cost[arm]["flops"] / cost["b"]["flops"] - 1) < 0.05, (arm, cost)
    assert cost["a"]["steps"] == setting["seed_steps"] + 5 * setting["branch_steps"]
    assert cost["c"]["params_per_token"] > 2 * cost["b"]["params_per_token"]
    for domain in DOMAINS:
        row = setting["per_domain"][domain]
        assert len(row["a"]["runs"]) == len(row["b"]["runs"]) == len(row["b_seed_decayed"]["runs"]) == 2
        assert row["a"]["min"] <= row["a"]["mean"] <= row["a"]["max"]
        assert 1 < row["a_routed"]["mean"] < 10_000 and 1 < row["c"] < 10_000 and 1 < row["d"] < 10_000
        assert row["a"]["mean"] < row["seed"]["mean"]  # a branch improves on its seed on its own domain
    assert set(result["routing_accuracy_test_documents"]) == set(DOMAINS)
