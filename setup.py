"""Package list for setuptools; everything else is in pyproject.toml.

The examples live in ``examples/`` but install as ``resu_examples`` (a top-level ``examples``
package would collide with other projects'). pyproject.toml can either list packages by name or
find them on disk, not both, and a package under another name than its folder must be listed, so
the list is built here: every ``resu_compile`` package found on disk plus the renamed one.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["resu_compile", "resu_compile.*"]), "resu_examples"],
    package_dir={"resu_examples": "examples"},
)
