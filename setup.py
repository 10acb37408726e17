"""Packages and the one compiled part for setuptools (the project's metadata is in pyproject.toml).

The Hydra config tree stays at the top level (``conf/``) and ships inside the wheel as the
package ``search.conf`` (``search.space.conf_dir`` finds it there, or in a checkout).

KEN's per-row selection (prunelib/_ken_native.c) is an optional C extension: without a C
compiler the install still succeeds and prunelib.methods.ken falls back to its torch path
(slower on CPU, same positions), saying so once.
"""

from pathlib import Path

from setuptools import Extension, find_packages, setup

CONF = Path(__file__).parent / "conf"
groups = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
conf_packages = ["search.conf"] + [f"search.conf.{g}" for g in groups]

setup(
    packages=find_packages(include=["prunelib*", "search*", "dashboards*"]) + conf_packages,
    package_dir={"search.conf": "conf", **{f"search.conf.{g}": f"conf/{g}" for g in groups}},
    package_data={"search": ["py.typed"], "dashboards": ["static/*"],
                  **{p: ["*.yaml"] for p in conf_packages}},
    ext_modules=[
        Extension(
            "prunelib._ken_native",
            sources=["prunelib/_ken_native.c"],
            # No FMA contraction: the grid and the densities round as the torch path does.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"],
            optional=True,
        )
    ],
)
