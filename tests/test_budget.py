"""A run's budgets: which one ends it (StepCounters.budget_spent) and what the console's bar shows of them."""
from dgpo.train.metrics_log import BudgetBar
from dgpo.train.sections import RunConfig
from dgpo.train.state import StepCounters


def test_budget_spent_is_the_largest_share_of_the_set_budgets():
    counters = StepCounters(step=10, forward_equivalents=300.0, elapsed_seconds=30.0)
    assert counters.budget_spent(100) == 0.1
    assert counters.budget_spent(100, max_seconds=60.0) == 0.5
    assert counters.budget_spent(100, max_seconds=60.0, max_forward_equivalents=200.0) == 1.5
    assert counters.budget_spent(10) == 1.0
    assert counters.budget_spent(0) == 1.0  # no steps asked for: done before the first


def test_bar_counts_steps_or_the_budget_share_that_ends_the_run():
    counters = StepCounters()
    by_steps = BudgetBar(RunConfig(max_steps=4), counters)
    by_time = BudgetBar(RunConfig(max_steps=1000, max_seconds=40.0), counters)
    counters.step, counters.elapsed_seconds = 1, 10.0
    by_steps.advance(reward="0.5")
    by_time.advance(reward="0.5")
    assert (by_steps.bar.n, by_steps.bar.total) == (1, 4)
    assert (by_time.bar.n, by_time.bar.total) == (25.0, 100)
    assert by_time.bar.postfix == "step=1, reward=0.5"
