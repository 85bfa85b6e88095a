"""The machine a run trains on, recorded beside its training seconds: seconds measured on two kinds of CPU (or GPU)
compare the machines as much as the methods, so a run keeps which machine trained which of its steps, and `dgpo
compare` says when the seconds it sets side by side come from different ones."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, as on macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def describe_machine() -> dict:
    """The CPU (its name, family and model where the OS tells them, and the vector instructions torch uses), the cores
    and torch threads, the accelerator if any, and torch's version."""
    info = _cpuinfo()
    cpu = info.get("model name") or platform.processor() or platform.machine()
    if info.get("cpu family") and info.get("model"):
        cpu += f" (family {info['cpu family']}, model {info['model']})"
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "accelerator": accelerator, "torch": torch.__version__}


def machine_label(machine: dict) -> str:
    """One line naming what sets a machine's speed: its accelerator where it has one, else its CPU and threads."""
    if machine.get("accelerator"):
        return machine["accelerator"]
    return f"{machine['cpu']} {machine['cpu_capability']}, {machine['threads']} threads"
