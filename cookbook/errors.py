"""Errors of the tracking store, importable without MLflow (the command line maps them to one line and an exit code)."""


class StoreFailure(RuntimeError):
    """The tracking store cannot take this run's writes (full, read-only) or is out of reach at the end of the run."""


class StoreUnusable(StoreFailure):
    """The store cannot be written at all (read-only, full, missing folder); found before any run is created."""
