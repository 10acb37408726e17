"""The composed Hydra config, as the sweep gets it: composition for notebooks and scripts, and
the checks every key goes through (:mod:`search.settings` types and checks each group once,
:mod:`search.preflight` what needs a registry; this module keeps the short names older code
uses).

Every error is a :class:`~search.space.ConfigError` whose message starts with the key at
fault (``trial.epochs: -1 must be >= 1``), so a typo costs seconds, not a sweep.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from search.preflight import SAMPLERS, method_pool, preflight
from search.settings import SearchSettings
from search.space import ConfigError, SearchSpace, conf_dir, discover_method_configs

__all__ = ["ConfigError", "SAMPLERS", "validate_config", "build_search_space", "method_configs", "load_config"]


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check a resolved config (plain dict) and raise ConfigError naming the first bad key.

    The pre-flight's static part: the schema of every section, the method settings and spaces
    and the objectives; nothing is built or opened.
    """
    preflight(cfg, build=False, open_stores=False)


def method_configs(cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The method configs this sweep covers: the pinned one, or the unpinned pool."""
    return method_pool(cfg)


def build_search_space(cfg: Mapping[str, Any]) -> SearchSpace:
    """The sweep's :class:`~search.space.SearchSpace` (validated)."""
    search = SearchSettings.from_dict(cfg.get("search") or {})
    return SearchSpace(method_pool(cfg), pinned=bool(cfg.get("method")), search_settings=search.search_settings)


def config_sources(config_dir: str | None = None, searchpath: list[str] | None = None) -> list[tuple[str, str]]:
    """``[(schema, path), ...]`` of the config tree plus extra directories or ``pkg://`` modules."""
    sources = [("file", str(config_dir or conf_dir()))]
    for entry in searchpath or []:
        schema, sep, path = str(entry).partition("://")
        sources.append((schema, path) if sep else ("file", str(entry)))
    return sources


def load_config(overrides: list[str] | None = None, searchpath: list[str] | None = None) -> dict[str, Any]:
    """The resolved config ``python -m search <overrides>`` would run, as a plain dict.

    For notebooks and scripts: ``run_sweep(load_config(["+method=magnitude"]), "out")``.
    ``searchpath`` adds config directories (``file://DIR`` or ``pkg://module``), as Hydra's
    ``hydra.searchpath``; their ``method/*.yaml`` join an unpinned sweep.
    Raises ConfigError naming the first bad key (after Hydra's own composition errors).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    extra = list(searchpath or [])
    overrides = list(overrides or [])
    if extra:
        overrides.append("hydra.searchpath=[" + ",".join(e if "://" in e else f"file://{e}" for e in extra) + "]")
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    if not resolved.get("method"):
        resolved["method_pool"] = discover_method_configs(config_sources(searchpath=extra))
    validate_config(resolved)
    return resolved
