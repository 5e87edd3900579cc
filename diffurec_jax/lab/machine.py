"""Where a run or a measurement was made, described once for the ledger, reports and benches.

`describe()` goes into the ledger's run.json, the experiment's report.json and steps.json;
its keys keep the names those files always used ('platform' is the JAX device platform, as
the ledger's run.json files have it), so older files still read. `host()` is the part that
needs no accelerator: it does not start a JAX backend, so a benchmark's parent process can
call it without taking the device from its children.
"""

from __future__ import annotations

import os
import platform

import jax


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else what the `platform` module knows."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return model


def host() -> dict:
  """The computer and the software, without touching an accelerator."""
  return {
      "cpu": cpu_model(),
      # Cores this process may run on (a container or taskset can allow fewer than exist).
      "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count(),
      "cpu_count": os.cpu_count(),  # Cores the machine has.
      "processor": platform.processor() or platform.machine(),
      "os": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
  }


def describe() -> dict:
  """host() plus the JAX devices: JSON-serialisable, one flat dict."""
  devices = jax.devices()
  return {
      **host(),
      "platform": devices[0].platform,  # 'cpu', 'gpu' or 'tpu'.
      "backend": jax.default_backend(),
      "device": f"{len(devices)} x {devices[0].device_kind}",
      "devices": [device.device_kind for device in devices],
  }
