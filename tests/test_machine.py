"""The machine a run's seconds were measured on: described, labelled, and kept per stretch of training."""
from __future__ import annotations

import json

import torch

from dgpo.machine import describe_machine, machine_label
from dgpo.train.compare import NOT_RECORDED, run_machines
from dgpo.train.state import StepCounters


def test_this_machine_is_described_by_what_sets_its_speed():
    machine = describe_machine()
    assert machine["threads"] == torch.get_num_threads() and machine["torch"] == torch.__version__
    assert machine["cpu"] and machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    label = machine_label(machine)
    assert (machine["accelerator"] or machine["cpu"]) in label
    assert machine_label({**machine, "accelerator": "NVIDIA H200"}) == "NVIDIA H200"


def test_a_stretch_starts_only_where_the_machine_changes():
    here, there = describe_machine(), {**describe_machine(), "cpu": "another CPU"}
    counters = StepCounters()
    counters.enter_machine(here)
    counters.step, counters.elapsed_seconds = 25, 60.0
    counters.enter_machine(here)   # resumed on the same machine: the same stretch
    counters.enter_machine(there)  # resumed elsewhere: a new one from here
    assert counters.machines == [{"from_step": 0, "from_seconds": 0.0, "machine": here},
                                 {"from_step": 25, "from_seconds": 60.0, "machine": there}]


def test_steps_trained_before_machines_were_recorded_are_named_so(tmp_path):
    here = describe_machine()
    for stretches, expected in [([], [NOT_RECORDED]),
                                ([{"from_step": 0, "from_seconds": 0.0, "machine": here}], [machine_label(here)]),
                                ([{"from_step": 25, "from_seconds": 60.0, "machine": here}], [NOT_RECORDED, machine_label(here)])]:
        (tmp_path / "results.json").write_text(json.dumps({"machines": stretches}))
        assert run_machines(tmp_path) == expected
