"""``python -m search`` (or the ``prunesearch`` command): the Hydra entry point of a pruning sweep.

Examples::

    prunesearch +method=magnitude                   # one method, its `space:` searched
    prunesearch search.n_trials=12                  # the method itself is searched too
    prunesearch data=fashion_mnist model=lenet5 trial.epochs=5
    prunesearch model=custom model._target_=my_pkg.Net data=custom data._target_=my_pkg.make_data
    prunesearch cluster=ray cluster.address=auto trial.gpus=0.25
    prunesearch search.resume=true                  # continue the newest unfinished sweep

Exit status: 0 done; 2 a configuration error (one line naming the key; nothing started; Hydra's
own errors, such as an unknown config group option, too); 1 the sweep ran but no trial
finished; 3 a storage error: a write to the sweep's files or stores failed (full disk, quota,
read-only), nothing was left half-written and the sweep is resumable once space is freed;
130 interrupted (resumable).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from search.space import CONF_DIR, ConfigError, discover_method_configs


def _quiet() -> None:
    # Ray and Lightning are chatty; the sweep prints its own one line per trial (Tune's own
    # output is off while it runs: search.tune_callbacks.quiet_tune).
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Save Tune's experiment state at least every second, so a killed sweep resumes with
    # (almost) every finished trial; the rest are adopted from their trial_result.json.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    for name in ("lightning.pytorch", "lightning.fabric", "ray", "ray.tune", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Hydra logs INFO to the console and to <output>/__main__.log; the console shows warnings
    # only (a library's INFO line, such as matplotlib building its font cache on a first run,
    # is not the sweep's), the log file keeps everything.
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)
    # Hydra's log file lives in the sweep's directory: on a full disk a failed log write must not
    # print logging's own traceback on the console (the sweep says what failed, in one line).
    logging.raiseExceptions = False
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class _HydraStderr:
    """Holds what is written to stderr until the sweep's own code runs: Hydra reports its own
    errors (an unknown config option, bad override syntax) there, with a hint about
    HYDRA_FULL_ERROR, and exits 1 before ``_app`` runs; :func:`main` turns that into one line,
    exit 2. Released (written out) as soon as ``_app`` starts, or when Hydra returns."""

    def __init__(self) -> None:
        self.real = sys.stderr
        self.held = io.StringIO()
        self.app_started = False

    def hold(self) -> None:
        sys.stderr = self.held

    def release(self) -> None:
        if sys.stderr is self.held:
            sys.stderr = self.real
            self.real.write(self.held.getvalue())
            self.real.flush()

    def one_line(self) -> str:
        """Hydra's message, at most two lines joined, without its HYDRA_FULL_ERROR hint."""
        raw = [line for line in self.held.getvalue().splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
        lines = [line.strip() for line in raw]
        if not lines:
            return "Hydra could not compose the config"
        if any(line.startswith("Traceback") for line in lines):
            return lines[-1]
        if len(lines) > 1 and lines[1].endswith(":"):  # "Available options in 'model':", then one per indented line
            options = []
            for line in raw[2:]:
                if not line[:1].isspace():
                    break
                options.append(line.strip())
            return f"{lines[0]}; {lines[1]} {', '.join(options)}"
        return " ".join(lines[:2])


_STDERR = _HydraStderr()


def _fail(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    """Resolve the config, pick the output directory (resume or new) and run the sweep."""
    _STDERR.app_started = True
    _STDERR.release()
    _quiet()
    from search.storage import StorageError
    from search.tuner import SweepFailed, find_resume_dir, run_sweep

    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # an interpolation that does not resolve
        _fail(f"config error: {str(exc).splitlines()[0]}", 2)
    assert isinstance(resolved, dict)
    runtime = HydraConfig.get().runtime
    output_dir = Path(runtime.output_dir)
    search = resolved["search"]
    try:
        if not resolved.get("method"):
            # Method configs anywhere on Hydra's search path (--config-dir, hydra.searchpath) join.
            sources = [(s.schema, s.path) for s in runtime.config_sources if s.schema in ("file", "pkg")]
            resolved["method_pool"] = discover_method_configs(sources)
        if search.get("resume"):
            if search.get("resume_dir"):
                output_dir = Path(search["resume_dir"]).expanduser().resolve()
            else:
                root = Path(runtime.cwd) / "outputs"
                found = find_resume_dir(root)
                if found is None:
                    raise ConfigError(f"search.resume: no unfinished sweep under {root}; pass "
                                      "search.resume_dir=<the sweep's output directory>")
                output_dir = found
                resolved["search"]["resume_dir"] = str(found)
        run_sweep(resolved, output_dir)
    except ConfigError as exc:  # one clear line, no traceback: the key and what is wrong
        _fail(f"config error: {exc}", 2)
    except SweepFailed as exc:
        _fail(f"sweep failed: {exc}", 1)
    except StorageError as exc:  # the sweep's state stays resumable (search.tuner)
        _fail(f"storage error: {exc}; nothing was left half-written; free space and resume with: "
              f"python -m search <same overrides> search.resume=true search.resume_dir={output_dir}", 3)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        ray = sys.modules.get("ray")  # a refusal before Ray started need not import it
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def main() -> None:
    """The ``prunesearch`` console command (``python -m search`` runs the same).

    Dotted paths (``model._target_``, ``data._target_``, ``module._target_``) resolve against the
    launch directory, as with ``python -m``: it is put first on ``sys.path``.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    _STDERR.hold()
    try:
        _app()
    except SystemExit as exc:
        if exc.code == 1 and not _STDERR.app_started:  # Hydra's own error: a config error, not "no trial finished"
            sys.stderr = _STDERR.real
            _fail(f"config error: {_STDERR.one_line()}", 2)
        raise
    finally:
        _STDERR.release()


if __name__ == "__main__":
    main()
