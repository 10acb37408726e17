"""The pre-flight's building step: data, model (and a user's LightningModule) built once on the
CPU and run on one real batch, in a process of its own (:class:`BuildProcess`) so that the
sweep's driver never imports Lightning, torchmetrics or transformers.

:mod:`search.preflight` starts it and reads what it learned (:func:`search.preflight.apply_build`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.errors import ConfigError

__all__ = ["BuildProcess", "absolute_paths", "build_check", "build_once", "one_line"]


def one_line(exc: BaseException) -> str:
    """The last line of an exception's message (its type's name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def build_once(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Build data, model (and the user's module) on the CPU, run the model on one real training
    batch, and the module on one validation batch. Returns ``input_shape``, ``num_classes``,
    ``logged`` (the module's validation metrics, None for the built-in module) and ``notes``."""
    from search.settings import ModuleSettings, TrialSettings

    # Runs in a process of its own: the groups it reads are typed here, once.
    trial, module_cfg = TrialSettings.from_dict(cfg["trial"]), ModuleSettings.from_dict(cfg.get("module"))
    data, model_cfg, seed = cfg["data"], cfg["model"], int(trial.seed)
    dm, x = _build_data(data, seed)
    input_shape, num_classes = tuple(int(s) for s in dm.input_shape), int(dm.num_classes)
    model_key = "model._target_" if model_cfg.get("_target_") else "model.name"
    label = model_cfg.get("_target_") or model_cfg.get("name")
    model = _build_model(model_cfg, input_shape, num_classes, seed, model_key, label)
    notes: list[str] = []
    logged: set[str] | None = None
    module, network = None, model
    if module_cfg.target:
        module, network = _build_module(module_cfg, model, input_shape, num_classes, trial)
        if network is not model:
            notes.append(f"module._target_={module_cfg.target} builds its own network "
                         f"({type(network).__name__}); model.* is not used")
    _check_forward(network, x, num_classes, model_key, label)
    if module is not None:
        logged = _validate_module(module, dm, module_cfg.target)
    return {"input_shape": input_shape, "num_classes": num_classes, "logged": logged, "notes": notes,
            "data": repr(dm)}


def _build_data(data: Mapping[str, Any], seed: int) -> tuple[Any, Any]:
    """The data module of ``data`` and one training batch of it (4 samples)."""
    import torch

    from prunelib.data import DataSourceError, DatasetNotFoundError, datamodule_from_config
    from prunelib.data.labels import check_datamodule_labels
    from prunelib.targets import TargetError

    data_key = "data._target_" if data.get("_target_") else "data.root" if "root" in data else "data"
    try:
        dm = datamodule_from_config(data, seed=seed, device="cpu")
    except TargetError as exc:
        raise ConfigError(str(exc)) from exc
    except DataSourceError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("data") else f"{data_key}: {msg}") from exc
    except (DatasetNotFoundError, OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"{data_key}: {one_line(exc)}") from exc
    try:
        # Every split's labels within the class count the trials use, two classes or more, lengths
        # that match what the splits yield: a stray label never silently changes every trial's model.
        check_datamodule_labels(dm, configured=data.get("num_classes") is not None)
    except DataSourceError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        x, _ = dm.sample_batch("train", n=4, generator=torch.Generator().manual_seed(seed))
    except Exception as exc:
        raise ConfigError(f"{data_key}: could not read a training batch: {type(exc).__name__}: {one_line(exc)}") from exc
    return dm, x


def _build_model(model_cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int, seed: int,
                 model_key: str, label: Any) -> Any:
    import torch

    from prunelib.models import model_from_config
    from prunelib.targets import TargetError

    try:
        torch.manual_seed(seed)
        return model_from_config(model_cfg, input_shape, num_classes)
    except TargetError as exc:
        raise ConfigError(str(exc)) from exc
    except Exception as exc:
        raise ConfigError(f"{model_key}={label}: {type(exc).__name__}: {one_line(exc)}") from exc


def _build_module(module_cfg: Any, model: Any, input_shape: tuple[int, ...], num_classes: int,
                  trial: Any) -> tuple[Any, Any]:
    """The user's LightningModule and the network it trains (:func:`prunelib.training.network_of`)."""
    from prunelib.targets import TargetError
    from prunelib.training import network_of
    from search.trials.training import build_module

    try:
        module = build_module(module_cfg, model, input_shape, num_classes, trial)
    except (TargetError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc
    return module, network_of(module)


def _check_forward(network: Any, x: Any, num_classes: int, model_key: str, label: Any) -> None:
    """The network's output on the batch ``x`` is one logit per class."""
    import torch

    was = network.training
    network.eval()
    try:
        with torch.no_grad():
            out = network(x)
    except Exception as exc:
        raise ConfigError(f"{model_key}={label}: forward pass on a batch of shape {tuple(x.shape)} raised "
                          f"{type(exc).__name__}: {one_line(exc)}") from exc
    network.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{model_key}={label}: output {shape} for a batch of shape {tuple(x.shape)}; expected "
                          f"({x.shape[0]}, {num_classes}) (one logit per class of the data)")


def _validate_module(module: Any, dm: Any, target: str | None) -> set[str]:
    """The metric names the user's module logs on one validation batch."""
    from prunelib.training import TrainConfig, validate_module

    try:
        return set(validate_module(module, dm, TrainConfig(accelerator="cpu", progress=False), limit_batches=1))
    except Exception as exc:
        raise ConfigError(f"module._target_={target}: one validation batch raised "
                          f"{type(exc).__name__}: {one_line(exc)}") from exc


_PATH_KEYS = {"data": ("root", "path", "test_path"), "search": ("storage", "resume_dir")}


def absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    from search.storage import is_uri

    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
    for section, keys in _PATH_KEYS.items():
        sec = out.get(section)
        if not isinstance(sec, dict):
            continue
        for key in keys:
            value = sec.get(key)
            if isinstance(value, str) and value and not is_uri(value) and value != "???":
                sec[key] = str(Path(os.path.expanduser(value)).absolute())
    return out



def build_check(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The pre-flight's building step on a config that passed :func:`preflight` ``(build=False)``:
    a text config's file and tokenizer, else data, model and module built once on a batch
    (:func:`build_once`). Returns what :func:`apply_build` takes (plain JSON types).

    Raises:
        ConfigError: naming the key at fault.
    """
    from search.trials.text_config import check_text_data, check_text_methods, is_text_config

    if is_text_config(cfg["data"], cfg["model"]):
        check_text_data(cfg)  # the text file and the model's tokenizer
        check_text_methods(cfg)  # methods that check themselves on the model (llm_structured)
        return {"text": True}
    built = build_once(cfg)
    return {**built, "input_shape": list(built["input_shape"]),
            "logged": sorted(built["logged"]) if built["logged"] is not None else None}


#: What the build process runs: the config on stdin, one JSON line on stdout.
_BUILD_PROCESS = """
import json, sys
request = json.loads(sys.stdin.read())
sys.path[:0] = [p for p in request["sys_path"] if p not in sys.path]
try:
    from search.preflight_build import build_check
    from search.errors import ConfigError
    try:
        reply = {"built": build_check(request["cfg"])}
    except ConfigError as exc:
        reply = {"config_error": str(exc)}
except Exception as exc:
    reply = {"error": f"{type(exc).__name__}: {exc}"}
print()  # after anything the build printed
print(json.dumps(reply, default=str), flush=True)
"""


class BuildProcess:
    """:func:`build_check` in a process of its own, started at once: a sweep's driver builds
    nothing itself (no Lightning, torchmetrics or transformers there), and the build, with its
    imports, runs while Ray starts. :meth:`result` waits for it; :meth:`stop` ends it early (the
    sweep was refused for another reason).
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Start building what ``cfg`` (the resolved config: its relative paths are taken from
        the launch directory, as :func:`preflight` does) describes."""
        import json
        import subprocess
        import sys

        cfg = absolute_paths(dict(cfg))

        self._proc = subprocess.Popen([sys.executable, "-c", _BUILD_PROCESS], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"cfg": cfg, "sys_path": [p for p in sys.path if p]}, default=str))
        self._proc.stdin.close()  # the build starts now
        self._proc.stdin = None  # (communicate() would flush the closed pipe)

    def result(self) -> dict[str, Any]:
        """What :func:`build_check` returned.

        Raises:
            ConfigError: what the build found, or that the build process failed (one line).
        """
        import json

        out, err = self._proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        try:
            reply = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            last = (err.strip().splitlines() or [f"exit status {self._proc.returncode}"])[-1]
            raise ConfigError(f"pre-flight: the process building the data and the model died ({last[:200]})") from None
        if "config_error" in reply:
            raise ConfigError(reply["config_error"])
        if "error" in reply:
            raise ConfigError(f"pre-flight: building the data and the model failed: {reply['error'][:300]}")
        return reply["built"]

    def stop(self) -> None:
        """End the build process if it still runs (after :meth:`result`, it has ended)."""
        if self._proc.returncode is not None:
            return
        self._proc.kill()
        self._proc.communicate()

