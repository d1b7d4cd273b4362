"""Where a sweep's runs are measured: on Ray, one task per run (a local instance started in this
process, or a cluster joined by address), or one after another in this process. Either way a run
that fails is a result with its one-line error, never the end of the sweep."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ra_probe.errors import UserError, first_line
from ra_probe.host import available_cpus
from ra_probe.sweeps.spec import Run

RAY_MISSING = "Ray is not installed (pip install 'ra-probe[ray]'): the runs go one after another in this process"


@dataclass
class Finished:
    """A run's outcome: its report, or the one-line error it failed with; seconds it took (None when
    its worker died)."""

    run: Run
    report: dict[str, Any] | None
    error: str | None
    seconds: float | None


def measure_run(run: Run, threads: int | None = None, cwd: str | None = None) -> tuple[Any, str | None, float]:
    """Probe one run as `ra-probe MODEL` does: (report dict or None, error or None, seconds). `threads`
    and `cwd` are set in a worker process of its own (never in the caller's)."""
    import torch

    from ra_probe.api import probe
    from ra_probe.host import own_process

    if threads is not None:  # a worker of its own: its threads and folder are the run's to set
        own_process()  # as the command line does
        torch.set_num_threads(threads)
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)
    started = time.perf_counter()
    try:
        report = probe(run.model, run.data, run.settings, cache=run.cache, **run.loading).to_dict()
        return report, None, time.perf_counter() - started
    except UserError as exc:
        return None, first_line(exc), time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - out of memory, a broken model: this run fails, the sweep goes on
        return None, f"{type(exc).__name__}: {first_line(exc)}", time.perf_counter() - started


class LocalExecutor:
    """The runs one after another in this process, with its threads as they are."""

    name = "local"

    def describe(self) -> dict[str, Any]:
        import torch

        return {"name": self.name, "version": None, "address": None,
                "resources": {"CPU": torch.get_num_threads(), "GPU": torch.cuda.device_count()},
                "per_run": {"num_cpus": torch.get_num_threads(), "num_gpus": min(1, torch.cuda.device_count())}}

    def map(self, runs: list[Run]) -> Iterator[Finished]:
        for run in runs:
            yield Finished(run, *measure_run(run))


class RayExecutor:
    """One Ray task per run: a GPU each when the cluster has GPUs (`gpus_per_run` to share or span
    them), else its share of the CPUs, with as many torch threads as it has CPUs."""

    name = "ray"

    def __init__(self, runs: list[Run], gpus_per_run: float | None = None, cpus_per_run: int | None = None):
        import ray

        resources = ray.cluster_resources()
        self.cpus, self.gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
        wants_gpu = self.gpus > 0 and any(run.settings.device is None or run.settings.device.startswith("cuda")
                                          for run in runs)
        self.num_gpus = (gpus_per_run if gpus_per_run is not None else 1.0) if wants_gpu else 0.0
        if self.num_gpus > self.gpus:
            raise UserError(f"--gpus-per-run {self.num_gpus:g}: the cluster has {self.gpus:g} GPU(s)")
        slots = int(self.gpus // self.num_gpus) if self.num_gpus else self.cpus
        self.num_cpus = cpus_per_run or max(1, self.cpus // max(1, min(len(runs), slots)))
        self.version, self.address = ray.__version__, ray.get_runtime_context().gcs_address

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "address": self.address,
                "resources": {"CPU": self.cpus, "GPU": self.gpus},
                "per_run": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}}

    def map(self, runs: list[Run]) -> Iterator[Finished]:
        """Submit every run, then yield each as it finishes; what is still pending when the caller stops
        (Ctrl-C) is cancelled."""
        import ray

        task = ray.remote(max_retries=0)(measure_run).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        pending = {task.remote(run, self.num_cpus, os.getcwd()): run for run in runs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                run = pending.pop(ready[0])
                try:
                    yield Finished(run, *ray.get(ready[0]))
                except ray.exceptions.RayError as exc:  # its worker died: killed for memory, crashed
                    yield Finished(run, None, f"{type(exc).__name__}: {first_line(exc)}", None)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


@contextmanager
def executor(kind: str, runs: list[Run], *, address: str | None = None, cpus: int | None = None,
             gpus_per_run: float | None = None, cpus_per_run: int | None = None) -> Iterator[Any]:
    """The executor `kind` ("ray", "local", or "auto": Ray when installed) for `runs`. On Ray, an
    instance already started in this process is used as it is; else `address` is joined ("auto",
    "ray://host:port") or a local instance with `cpus` CPUs is started, and shut down after."""
    if kind == "local" or (kind == "auto" and address is None and not ray_installed()):
        yield LocalExecutor()
        return
    if not ray_installed():
        raise UserError("Ray is not installed: pip install 'ra-probe[ray]' (or run the sweep without --address)")
    import ray

    started = not ray.is_initialized()
    if started:
        import logging

        try:
            if address is not None:
                ray.init(address=address, logging_level=logging.ERROR)
            else:
                _start_local_ray(cpus or available_cpus())
        except Exception as exc:  # noqa: BLE001 - no cluster at that address, no room for a local one
            raise UserError(f"cannot start Ray{'' if address is None else f' at {address}'}: {first_line(exc)}") \
                from None
    try:
        yield RayExecutor(runs, gpus_per_run, cpus_per_run)
    finally:
        if started:
            ray.shutdown()


def _start_local_ray(cpus: int) -> None:
    """A Ray instance on this machine that listens on the loopback address only: Ray's ports take
    commands from anyone who reaches them, and by default it binds the machine's network address.
    Ray keeps single machines on loopback where it does not support clusters (its ENABLE_RAY_CLUSTER,
    read when it picks the node's address); that choice is made for this start and put back."""
    import logging

    import ray
    from ray._private import ray_constants

    clusters = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters


def ray_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("ray") is not None
