"""What a training trial imports before it trains, imported ahead by the workers of a local Ray
a sweep starts (Ray's ``preload_python_modules``, see :func:`search.ray_session.init_ray`).

Ray prestarts one worker per CPU while the pre-flight runs; a trial that lands on one of them
finds Lightning, prunelib and MLflow (6-8 s in a fresh process on this 2-core machine) already imported.
Ray runs workers at a lower priority (niceness 15), so this takes only what the driver leaves.
"""

from __future__ import annotations

import importlib

#: The modules, in import order (the heaviest, Lightning, comes with the second).
TRIAL_IMPORTS = ("ray.tune", "search.trials.training", "search.trials.run", "search.trials.mlflow_run")


def _import_all() -> None:
    for name in TRIAL_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (the trial imports it again and reports what failed, in its own run)
            return


_import_all()
