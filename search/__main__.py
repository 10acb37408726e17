"""``python -m search``: the Hydra entry point of a pruning sweep.

Examples::

    python -m search +method=magnitude              # one method, its `space:` searched
    python -m search search.n_trials=12             # the method itself is searched too
    python -m search data=fashion_mnist model=lenet5 trial.epochs=5
    python -m search cluster=ray cluster.address=auto trial.gpus=0.25
    python -m search search.resume=true             # continue the newest unfinished sweep
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from search.space import CONF_DIR, ConfigError


def _quiet() -> None:
    # Ray and Lightning are chatty; the sweep prints its own one line per trial.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Save Tune's experiment state at least every second, so a killed sweep resumes with
    # (almost) every finished trial; MLflow keeps one record per trial id either way.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    for name in ("lightning.pytorch", "lightning.fabric", "ray", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Resolve the config, pick the output directory (resume or new) and run the sweep."""
    from search.tuner import find_resume_dir, run_sweep

    _quiet()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    search = resolved["search"]
    if search.get("resume"):
        if search.get("resume_dir"):
            output_dir = Path(search["resume_dir"]).resolve()
        else:
            root = Path(HydraConfig.get().runtime.cwd) / "outputs"
            found = find_resume_dir(root)
            if found is None:
                print(f"config error: search.resume: no unfinished sweep under {root}; "
                      "pass search.resume_dir=<the sweep's output directory>", file=sys.stderr)
                sys.exit(2)
            output_dir = found
        print(f"resuming the sweep in {output_dir}", flush=True)
    try:
        run_sweep(resolved, output_dir)
    except ConfigError as exc:  # one clear line, no traceback: the key and what is wrong
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass


if __name__ == "__main__":
    main()
