"""Print the requirements of pyproject.toml, one a line: what a wheel build of imgdl
needs from an index (the dependencies, those of the extras named in argv[1], the
build system's), for the Dockerfile's one networked step. Standard library only."""

import sys
import tomllib

with open("pyproject.toml", "rb") as handle:
    pyproject = tomllib.load(handle)
project = pyproject["project"]
extras = [name.strip() for name in (sys.argv[1] if len(sys.argv) > 1 else "").split(",")]
needed = list(project["dependencies"])
for name in filter(None, extras):
    needed += project["optional-dependencies"][name]
needed += pyproject["build-system"]["requires"] + ["wheel"]
print("\n".join(needed))
