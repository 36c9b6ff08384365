"""Print the project's dependencies (pyproject.toml) as a pip requirements file.

The image installs these before it copies the code, so that a code change does not
reinstall TensorFlow. ``--tensorflow`` names the TensorFlow distribution of the image
(``tensorflow-cpu`` for the CPU image, ``tensorflow[and-cuda]`` for the GPU one); the
version range stays the one pyproject.toml asks for.

    python docker/requirements.py pyproject.toml --tensorflow tensorflow-cpu
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# The distribution name at the start of a requirement, e.g. "tensorflow" in "tensorflow>=2.16".
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?")


def requirements(pyproject: Path, tensorflow: str) -> list[str]:
    """The ``[project] dependencies`` with TensorFlow's distribution replaced."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = []
    for requirement in project.get("dependencies", []):
        match = _NAME.match(requirement)
        if match and match.group(1).lower() == "tensorflow":
            requirement = tensorflow + requirement[match.end():]
        lines.append(requirement)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Write the requirements to stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--tensorflow", default="tensorflow-cpu",
                        help="TensorFlow distribution (default: tensorflow-cpu)")
    args = parser.parse_args(argv)
    sys.stdout.write("\n".join(requirements(args.pyproject, args.tensorflow)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
