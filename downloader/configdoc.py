"""docs/configuration.md and config/imgdl.yaml, rendered from the settings model.

Each key's type, range, default and meaning are written once, in
``settings.py`` (``Field(description=...)``, a docstring per section); its flag
is read from the ``fetch`` command. This module renders them for people: the
reference page and the documented default file. ``tests/test_configdoc.py``
fails when a committed file differs from what this renders, so neither can
fall behind the code.

    python -m downloader.configdoc            # the Markdown page, on stdout
    python -m downloader.configdoc --yaml     # the default YAML file, on stdout
    python -m downloader.configdoc --write    # both, into docs/ and config/ (make docs)
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from pathlib import Path

import click
from pydantic import BaseModel

from downloader import settings as settings_mod
from downloader.settings import SECTIONS, default_of, describe, env_name, yaml_value

REPO = Path(__file__).resolve().parent.parent
MARKDOWN_PATH = Path("docs/configuration.md")
YAML_PATH = Path("config/imgdl.yaml")
REGENERATE = "`make docs` (or `.venv/bin/python -m downloader.configdoc --write`)"

_MARKDOWN_HEAD = """\
# Configuration

<!-- Generated from downloader/settings.py by `make docs`: edit the descriptions
there, not this file. tests/test_configdoc.py fails when the two differ. -->

Every setting of imgdl: its type and allowed values, default, environment
variable, flag, and what it does. Each value comes from the highest of four
layers that sets it:

1. a command-line flag (`--concurrency 32`), for the keys that have one;
2. an environment variable `IMGDL_<SECTION>_<KEY>` (`IMGDL_HTTP_CONCURRENCY=32`;
   `IMGDL_HTTP__CONCURRENCY` works too). Values are read as YAML, and a list
   may also be written `a,b,c`;
3. the YAML file named by `--config FILE` or `IMGDL_CONFIG=FILE`
   ([`config/imgdl.yaml`](../config/imgdl.yaml) lists every key with its default);
4. the default.

Try it: the flag beats the variable, which beats the file.

```sh
printf 'http:\\n  concurrency: 8\\nlimits:\\n  rate: 5\\n' > my.yaml
IMGDL_HTTP_CONCURRENCY=16 IMGDL_RUN_SHARD_SIZE=500 \\
  imgdl config show --config my.yaml --concurrency 32
```

prints every key with its value and where that came from; among them:

```
run.shard_size               500                                       # env IMGDL_RUN_SHARD_SIZE
http.concurrency             32                                        # flag --concurrency
http.read_timeout            30.0                                      # default
limits.rate                  5.0                                       # config my.yaml
```

An unknown key or a bad value stops every command with exit code 2 and one
line that names the key, where it was set and how to fix it.
`imgdl config validate FILE` checks a file on its own and lists all of its
problems, each as `FILE:LINE: KEY: message`.
"""

_YAML_HEAD = """\
# imgdl: the documented default configuration.
#
# Every key is shown with its default value. Precedence, highest first:
#   command-line flags  >  IMGDL_* environment variables  >  this file  >  built-in defaults
# Point imgdl at a file with `--config FILE` or `IMGDL_CONFIG=FILE`.
# Environment variables are named IMGDL_<SECTION>_<KEY>, e.g. IMGDL_HTTP_CONCURRENCY=32
# (IMGDL_HTTP__CONCURRENCY works too). `imgdl config show` prints the effective
# value of every key and where it came from; `imgdl config validate FILE` lists
# every problem of a file. An unknown key is an error.
#
# Generated from downloader/settings.py by `make docs`; docs/configuration.md says
# the same with types and ranges. Edit the descriptions there, not this file.
"""


def flags() -> dict[str, str]:
    """Dotted key → its flag(s), as ``imgdl fetch --help`` shows them."""
    from downloader.cli import fetch

    found: dict[str, str] = {}
    for param in fetch.params:
        key = (param.name or "").replace("__", ".")
        if isinstance(param, click.Option) and key in settings_mod.KEYS:
            found[key] = ", ".join(sorted(param.opts, key=len))
            if param.secondary_opts:  # a switch: --progress / --no-progress
                found[key] += " / " + ", ".join(param.secondary_opts)
    return found


def _doc(model: type[BaseModel]) -> str:
    return " ".join((inspect.getdoc(model) or "").split())


def _fill(text: str) -> str:
    return textwrap.fill(text, 80, break_on_hyphens=False, break_long_words=False)


def _entries(section: str, name: str) -> list[tuple[str, str]]:
    """The keys of each entry of a mapping setting (limits.hosts), with their meaning."""
    entries: dict[tuple[str, str], type[BaseModel]] = {
        ("limits", "hosts"): settings_mod.HostLimits,
        ("hosts", "rules"): settings_mod.HostRule,
    }
    entry = entries.get((section, name))
    if entry is None:
        return []
    return [(key, field.description or "") for key, field in entry.model_fields.items()]


def markdown() -> str:
    """docs/configuration.md."""
    by_flag = flags()
    out = [_MARKDOWN_HEAD]
    out.append(_fill("Sections: " + ", ".join(f"[{s}](#{s})" for s in SECTIONS) + ".") + "\n")
    for section, model in SECTIONS.items():
        out.append(f"## {section}\n\n{_fill(_doc(model))}\n")
        for name, field in model.model_fields.items():
            key = f"{section}.{name}"
            kind, allowed = describe(field)
            lines = [f"### `{key}`\n", _fill(field.description or "") + "\n"]
            for entry, meaning in _entries(section, name):
                lines.append(f"- entry key `{entry}`: {meaning}")
            lines += [
                f"- type: {kind}" + (f", {allowed}" if allowed else ""),
                f"- default: `{yaml_value(default_of(model, name))}`",
                f"- environment: `{env_name(key)}`",
            ]
            if key in by_flag:
                lines.append(f"- flag: `{by_flag[key]}`")
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


_KEEP = "\0"  # joins words that a line break must not part ("Flag --rate")


def _comment(text: str, indent: str) -> list[str]:
    width = 80 - len(indent) - 2
    lines = textwrap.wrap(text, width, break_on_hyphens=False)
    return [f"{indent}# {line}".replace(_KEEP, " ") for line in lines]


def default_yaml() -> str:
    """config/imgdl.yaml: every key at its default, its meaning in a comment above it."""
    by_flag = flags()
    out = [_YAML_HEAD]
    for section, model in SECTIONS.items():
        out += _comment(_doc(model), "")
        out.append(f"{section}:")
        for name, field in model.model_fields.items():
            key = f"{section}.{name}"
            text = field.description or ""
            if key in by_flag:
                flag = by_flag[key].split(", ")[-1].replace(" ", _KEEP)
                text += f" Flag{_KEEP}{flag}."
            out += _comment(text, "  ")
            for entry, meaning in _entries(section, name):
                out += _comment(f"Entry key {entry}: {meaning}", "  ")
            out.append(f"  {name}: {yaml_value(default_of(model, name))}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m downloader.configdoc", description=__doc__)
    parser.add_argument("--yaml", action="store_true", help="print config/imgdl.yaml instead")
    parser.add_argument("--write", action="store_true", help="write both files into the repo")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in ((MARKDOWN_PATH, markdown()), (YAML_PATH, default_yaml())):
            (REPO / path).write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    else:
        print(default_yaml() if args.yaml else markdown(), end="")


if __name__ == "__main__":
    main()
