"""The sweep's stores, opened by the pre-flight before anything is written: the MLflow tracking
store, the Optuna study's RDB store and ``search.storage``. Each refusal is one
:class:`~search.errors.ConfigError` naming ``tracking.uri``, ``search.optuna_storage`` or
``search.storage``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from search.errors import ConfigError
from search.preflight_build import one_line
from search.settings import tracking_uri

if TYPE_CHECKING:
    from search.preflight import PreflightResult
    from search.settings import SearchSettings, TrackingSettings

__all__ = ["open_sweep_stores", "optuna_storage_url", "state_copy_in_mlflow", "tracking_uri"]


def optuna_storage_url(search: SearchSettings, tracking_uri_: str | None, output_dir: Path) -> str:
    """Where the Optuna study lives: ``search.optuna_storage``, else ``optuna.db`` beside the
    MLflow SQLite store, else in the sweep's output directory."""
    if search.optuna_storage:
        return str(search.optuna_storage)
    from search.paths import local_path

    if tracking_uri_ and tracking_uri_.startswith("sqlite:///"):
        path = local_path(tracking_uri_)
        if path is not None and str(path) not in ("", ":memory:"):
            return f"sqlite:///{path.expanduser().absolute().parent / 'optuna.db'}"
    return f"sqlite:///{output_dir / 'optuna.db'}"


def _check_optuna_storage(url: str) -> None:
    from search.tracking import TrackingUnavailableError, check_sqlite_file

    if not url.startswith("sqlite:///"):
        scheme = url.split("://", 1)[0]
        if scheme.split("+")[0] not in ("postgresql", "mysql", "sqlite"):
            raise ConfigError(f"search.optuna_storage: {url!r}: Optuna's RDB storage takes sqlite:///, "
                              "postgresql:// or mysql:// URLs")
        return
    try:
        check_sqlite_file(Path(url[len("sqlite:///"):]), url, mlflow_store=False)
    except TrackingUnavailableError as exc:
        raise ConfigError(f"search.optuna_storage: {exc}") from exc


def state_copy_in_mlflow(tracking: TrackingSettings, resume_dir: Path) -> bool:
    """Whether the sweep's MLflow parent run holds a copy of the missing ``sweep.json`` (the
    sweep then restores it: search.tuner)."""
    if not resume_dir.expanduser().is_dir():
        return False
    from search.tracking import saved_sweep_state

    return saved_sweep_state(tracking, resume_dir.expanduser().resolve()) is not None


def open_sweep_stores(result: PreflightResult, output_dir: str | os.PathLike | None) -> None:
    """Open the tracking store, the Optuna store and ``search.storage`` (their URLs go into
    ``result``).

    Raises:
        ConfigError: naming ``tracking.uri``, ``search.optuna_storage`` or ``search.storage``.
    """
    from search.storage import SweepStorage
    from search.tracking import TrackingUnavailableError, check_tracking

    settings = result.settings
    result.tracking_uri = tracking_uri(settings.tracking)
    if result.tracking_uri is not None:
        try:
            check_tracking(result.tracking_uri)
        except TrackingUnavailableError as exc:
            raise ConfigError(f"tracking.uri: {one_line(exc) if 'Start one' not in str(exc) else exc}") from exc
    out = Path(output_dir).absolute() if output_dir is not None else Path.cwd()
    result.optuna_storage = optuna_storage_url(settings.search, result.tracking_uri, out)
    _check_optuna_storage(result.optuna_storage)
    storage = settings.search.storage
    if storage:
        try:
            SweepStorage(storage).check()
        except Exception as exc:
            raise ConfigError(f"search.storage: {storage!r} cannot be written: "
                              f"{type(exc).__name__}: {one_line(exc)}") from exc
