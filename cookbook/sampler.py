"""MLflow's system-metrics sampler for a run: started with it, stopped without waiting on a store that is away."""
from __future__ import annotations

from .stop import at_most

STOP_TIMEOUT = 5.0  # seconds a run's end waits on a best-effort write: the sampler's last sample, a FAILED status


def start_sampler(run_id: str, uri: str):
    """MLflow's own sampler (CPU, memory, disk, network, and GPUs where NVML sees them) writing to the run, running."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    sampler = SystemMetricsMonitor(run_id, tracking_uri=uri)
    sampler.start()
    return sampler


def stop_sampler(sampler, timeout: float = STOP_TIMEOUT) -> bool:
    """sampler.finish(), waited on for at most `timeout` s; True if it finished. MLflow's finish() joins a thread that may
    be inside an HTTP call to a store that is away, with minutes of retries and no limit of its own."""
    return at_most(timeout, sampler.finish, "stop-system-metrics")
