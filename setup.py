"""Metadata lives in pyproject.toml; this adds the one build step: compiling serving/protos/.

`build_py` writes serving/_proto/ (see serving/protoc.py) into the wheel's build directory, or,
for an editable install (`pip install -e .`, `make setup`), into the source tree the install
points at. grpcio-tools comes from [build-system].requires.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protoc():
    """serving/protoc.py, loaded by path: the build must not import the `serving` package."""
    spec = importlib.util.spec_from_file_location("_adrec_protoc", ROOT / "serving" / "protoc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        protoc = _protoc()
        base = ROOT if self.editable_mode else Path(self.build_lib)
        protoc.write_package(base / "serving" / protoc.PACKAGE)


setup(cmdclass={"build_py": BuildPyWithProtos})
