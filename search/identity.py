"""A sweep's identity and name: what makes two runs of ``python -m search`` one experiment.

- :func:`sweep_identity`: the resolved config minus :data:`RESUMABLE_KEYS` (what a resume may
  change), as dotted keys, with the stores a sweep writes to resolved (the default MLflow and
  Optuna stores depend on the working directory). Recorded in ``sweep.json`` when a sweep starts.
- :func:`check_resume_identity`: a resume with another identity is refused, naming every key
  that differs (``search.resume_accept`` accepts named changes).
- :func:`claim_study_name`: a unique study and sweep name, claimed atomically in the Optuna
  store (two drivers racing for one name get two studies).

Imports neither Ray nor Lightning: it runs in the sweep's driver before Ray starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.errors import ConfigError

if TYPE_CHECKING:
    from search.settings import SearchSettings, SweepSettings

__all__ = ["RESUMABLE_KEYS", "accepted_keys", "check_resume_identity", "claim_study_name", "identity_diff",
           "sweep_identity"]

#: Keys a resume may change (a key or a whole section): how many trials and how fast, where and
#: on what they run; never what a trial is or where its results go. The README lists the same.
#: ``sweep_name``: a resumed sweep keeps its recorded name.
RESUMABLE_KEYS: tuple[str, ...] = (
    "search.n_trials", "search.budget", "search.concurrency", "search.resume", "search.resume_dir",
    "search.resume_accept", "cluster", "trial.max_retries", "trial.cpus", "trial.gpus", "sweep_name",
)


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = value


def sweep_identity(composed: Mapping[str, Any], output_dir: Path,
                   settings: SweepSettings | None = None) -> dict[str, Any]:
    """The sweep's identity: every dotted key of the resolved config ``composed`` not in
    :data:`RESUMABLE_KEYS`, JSON-normalised (as ``sweep.json`` holds it), with ``tracking.uri``
    and ``search.optuna_storage`` resolved to the stores this run would use (read from
    ``settings``, the sweep's parsed config; parsed from ``composed`` when a caller holds only
    the dict: a notebook, a test)."""
    from search.settings import SweepSettings, tracking_uri
    from search.sweep_stores import optuna_storage_url

    settings = settings if settings is not None else SweepSettings.from_dict(composed)
    # The composed dict, not the typed settings: the identity is every key as the user's config
    # resolved it (a key a resume may not change, whatever group or method it belongs to).
    flat: dict[str, Any] = {}
    _flatten(composed, "", flat)
    identity = {k: v for k, v in flat.items() if not _matches(k, RESUMABLE_KEYS)}
    uri = tracking_uri(settings.tracking)
    identity["tracking.uri"] = uri
    identity["search.optuna_storage"] = optuna_storage_url(settings.search, uri, output_dir)
    # Through JSON, as it comes back from sweep.json: tuples are lists, keys sorted.
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for every key whose value differs (a missing key: None)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if not _matches(k, RESUMABLE_KEYS) and old.get(k) != new.get(k)}


def accepted_keys(search: SearchSettings) -> list[str]:
    """``search.resume_accept`` as a list of dotted keys (a key accepts its whole section;
    checked as a list of names when the settings were parsed)."""
    return list(search.resume_accept or [])


def _short(value: Any, limit: int = 80) -> str:
    text = "unset" if value is None else (value if isinstance(value, str) else json.dumps(value, default=str))
    # Elided in the middle: a path's or a URI's scheme and its file name both stay readable.
    return text if len(text) <= limit else f"{text[:30]}...{text[-(limit - 33):]}"


def check_resume_identity(state: Mapping[str, Any], identity: Mapping[str, Any], accept: list[str],
                          output_dir: Path) -> list[dict[str, Any]]:
    """Compare this run's ``identity`` with the one ``sweep.json`` recorded.

    Returns:
        the accepted changes (``{"key", "old", "new"}``; [] when the configs match).

    Raises:
        ConfigError: a key differs that ``accept`` does not name (every such key, old -> new).
    """
    diff = identity_diff(state["identity"], identity)
    refused = {k: v for k, v in diff.items() if not _matches(k, accept)}
    if refused:
        listed = ", ".join(f"{k} ({_short(old)} -> {_short(new)})" for k, (old, new) in refused.items())
        raise ConfigError(f"search.resume: this config differs from the sweep in {output_dir}: {listed}; resume "
                          "with the sweep's config, or accept the change with "
                          f"search.resume_accept=[{','.join(refused)}]")
    return [{"key": k, "old": old, "new": new} for k, (old, new) in diff.items()]


def _is_locked(exc: Exception) -> bool:
    return "locked" in str(exc).lower() or "busy" in str(exc).lower()


def claim_study_name(storage: Any, base: str, directions: list[str], taken: Callable[[str], bool] = lambda n: False,
                     attempts: int = 1000) -> str:
    """Create a new Optuna study named ``base`` (else ``base-2``, ``base-3``, ...) and return its name.

    The study's creation is the claim: the store's unique constraint decides between two
    drivers racing for one name (``DuplicatedStudyError`` for the loser, who takes the next
    suffix). ``taken(name)`` skips names used elsewhere (an MLflow parent run of that name).

    Args:
        storage: an Optuna storage (an RDB URL or ``optuna.storages.BaseStorage``).
        base: the wanted name.
        directions: the study's objective directions (``maximize``/``minimize``).
        taken: True for a name already in use outside the Optuna store.
    """
    import optuna

    for n in range(1, attempts + 1):
        name = base if n == 1 else f"{base}-{n}"
        if taken(name):
            continue
        for wait in (0.1, 0.2, 0.5, 1.0, 2.0, None):
            try:
                optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=False)
                return name
            except optuna.exceptions.DuplicatedStudyError:
                break
            except Exception as exc:  # SQLite busy while another driver writes: wait, then try again
                if wait is None or not _is_locked(exc):
                    raise
                time.sleep(wait)
    raise ConfigError(f"sweep_name: {base!r} and its next {attempts - 1} suffixes are all taken")
