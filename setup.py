"""Build hook for the one compiled part: KEN's per-row selection (prunelib/_ken_native.c).

Everything else about the distribution lives in pyproject.toml. The extension is optional:
without a C compiler the install still succeeds and prunelib.methods.ken falls back to its
torch path (slower on CPU, same positions), saying so once.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "prunelib._ken_native",
            sources=["prunelib/_ken_native.c"],
            # No FMA contraction: the grid and the densities round as the torch path does.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
