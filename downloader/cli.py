"""The ``imgdl`` command: flags become settings overrides; errors become exit codes."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from downloader import __version__
from downloader import settings as settings_mod
from downloader.errors import ImgdlError
from downloader.hostrules import redacted
from downloader.proxy import ProxyRules
from downloader.report import EXIT_USAGE, summary_text

EXIT_CODES_HELP = """\b
Exit codes:
  0    every URL was saved or skipped
  1    some URLs failed (see OUTDIR/failures.txt)
  2    usage or configuration error (one line on stderr says what to fix)
  129  stopped by SIGHUP (the terminal closed)
  130  interrupted by SIGINT (Ctrl-C)
  143  terminated by SIGTERM
"""


def _examples(*lines: str) -> str:
    """An "Examples:" block that click prints as written (``\\b``: no rewrapping).

    Every command has one: tests/test_cli.py fails for a command without."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines) + "\n"


#: flag name → (dotted setting, click type, help)
_OVERRIDES: list[tuple[str, str, Any, str]] = [
    (
        "--output",
        "output.dir",
        click.Path(file_okay=False),
        "Output folder, or s3://BUCKET/PREFIX [default: images].",
    ),
    (
        "--state-dir",
        "s3.state_dir",
        click.Path(file_okay=False, path_type=Path),
        "With an s3:// output: the local folder of the records and resume state "
        "[default: ./imgdl-state/BUCKET/PREFIX].",
    ),
    ("--processes", "run.processes", click.IntRange(1), "Worker processes [default: CPUs]."),
    (
        "--concurrency",
        "http.concurrency",
        click.IntRange(1),
        "Downloads in flight per process [default: 64].",
    ),
    (
        "--rate",
        "limits.rate",
        click.FloatRange(min=0, min_open=True),
        "Requests per second for the whole run [default: unlimited].",
    ),
    (
        "--per-host-rate",
        "limits.per_host_rate",
        click.FloatRange(min=0, min_open=True),
        "Requests per second to each host, whole run [default: unlimited].",
    ),
    (
        "--per-host-connections",
        "limits.per_host_connections",
        click.IntRange(0),
        "Connections open to each host, whole run; 0: no limit [default: 0].",
    ),
    (
        "--http-client",
        "http.client",
        click.Choice(["builtin", "aiohttp"]),
        "HTTP client of direct requests: imgdl's own HTTP/1.1 client (less CPU), or "
        "aiohttp's (keeps cookies servers set; a fallback for a server the builtin one "
        "reads wrong). Proxied requests always use aiohttp [default: builtin].",
    ),
    ("--shard-size", "run.shard_size", click.IntRange(1), "URLs per shard [default: 1000]."),
    (
        "--shard-index",
        "run.shard_index",
        click.IntRange(0),
        "This task's index (0..N-1) when N tasks split the list; records go to "
        "OUTDIR/tasks/task-I-of-N/ [default: from JOB_COMPLETION_INDEX, "
        "AWS_BATCH_JOB_ARRAY_INDEX or CLOUD_RUN_TASK_INDEX].",
    ),
    (
        "--shard-count",
        "run.shard_count",
        click.IntRange(1),
        "The number of tasks N splitting the list [default: CLOUD_RUN_TASK_COUNT, "
        "AWS_BATCH_JOB_ARRAY_SIZE].",
    ),
    (
        "--input-format",
        "input.format",
        click.Choice(["auto", "txt", "csv", "tsv", "jsonl", "parquet"]),
        "Input format [default: auto, from the name or the first bytes].",
    ),
    ("--url-column", "input.url_column", str, "CSV column / JSON key of the URL [default: url]."),
    (
        "--name-column",
        "input.name_column",
        str,
        "CSV column / JSON key naming the saved file (without extension).",
    ),
    (
        "--extra-column",
        "input.extra_columns",
        "multiple",
        'A column / JSON key carried into each line\'s manifest record ("extra"); '
        "repeat for more, e.g. --extra-column caption --extra-column license.",
    ),
    (
        "--hash-column",
        "input.hash_column",
        str,
        "Column / JSON key of each image's expected sha256 or md5 (hex, optionally "
        "sha256:/md5: prefixed); a body that differs is hash_mismatch, not saved.",
    ),
    (
        "--name-template",
        "output.name_template",
        str,
        "Name of saved files, e.g. '{host}/{basename}' [default: {url_hash:.3}/{url_hash}].",
    ),
    (
        "--output-format",
        "output.format",
        click.Choice(["files", "webdataset", "parquet"]),
        "files: one file per image; webdataset: tar shards (00000.tar...) with a metadata "
        "parquet each; parquet: parquet shards holding the images [default: files].",
    ),
    (
        "--shard-samples",
        "output.shard_samples",
        click.IntRange(1),
        "Images per shard of the webdataset and parquet formats [default: 10000].",
    ),
    ("--max-bytes", "validate.max_bytes", click.IntRange(1), "Largest image to keep, in bytes."),
    (
        "--timeout",
        "http.total_timeout",
        click.FloatRange(min=0, min_open=True),
        "Total seconds per request [default: 120].",
    ),
    (
        "--revalidate",
        "run.revalidate",
        "flag",
        "Ask the server again (If-None-Match / If-Modified-Since) about images an "
        "earlier run saved: 304 keeps them (not_modified), 200 replaces them.",
    ),
    (
        "--tries",
        "retry.attempts",
        click.IntRange(1),
        "Tries per URL, the first included; 1: no retries [default: 3].",
    ),
    (
        "--resize-mode",
        "image.resize_mode",
        click.Choice(["no", "keep_ratio", "center_crop", "border"]),
        "Resize each image before storing it: keep_ratio (smaller side to --image-size), "
        "center_crop (then the middle square), border (fit in the square, padded) "
        "[default: no].",
    ),
    (
        "--image-size",
        "image.size",
        click.IntRange(1, 16384),
        "Target size in pixels of --resize-mode [default: 256].",
    ),
    (
        "--image-format",
        "image.format",
        click.Choice(["keep", "jpeg", "webp", "png"]),
        "Re-encode stored images to this format [default: keep].",
    ),
    (
        "--image-quality",
        "image.quality",
        click.IntRange(1, 100),
        "JPEG/WebP quality of re-encoded images [default: 95].",
    ),
    (
        "--dedupe-content",
        "dedupe.content",
        click.Choice(["off", "exact", "perceptual"]),
        "Store each image once: later copies are duplicate_content; perceptual also "
        "catches resized or re-encoded copies (pHash) [default: off].",
    ),
    (
        "--log-level",
        "log.level",
        click.Choice(["debug", "info", "warning", "error"]),
        "Log level [default: info].",
    ),
    (
        "--log-format",
        "log.format",
        click.Choice(["auto", "json", "console"]),
        "Log format [default: auto: console on a terminal, JSON otherwise].",
    ),
    (
        "--progress",
        "log.progress",
        "switch",
        "Show progress: a bar on a terminal, else a 'progress' log line every "
        "log.progress_interval seconds [default: on].",
    ),
]


def _setting_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add every override flag and ``--config`` to a command."""
    for flag, key, type_, help_ in reversed(_OVERRIDES):
        names = [flag, "-o"] if flag == "--output" else [flag]
        if type_ == "switch":
            names = [f"{flag}/--no-{flag[2:]}"]
        kind: dict[str, Any] = {"type": type_} if type_ not in ("flag", "switch") else {}
        if type_ == "flag":
            kind["is_flag"] = True
        if type_ == "multiple":  # repeatable, a list setting
            kind = {"type": str, "multiple": True}
        option = click.option(*names, key.replace(".", "__"), default=None, help=help_, **kind)
        func = option(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="YAML config file [default: $IMGDL_CONFIG].",
    )(func)
    return func


def _effective(config_file: Path | None, params: dict[str, Any]) -> settings_mod.Effective:
    flags = {flag: key for flag, key, _, _ in _OVERRIDES}
    by_key = {key: flag for flag, key in flags.items()}
    overrides: dict[str, tuple[Any, str]] = {}
    for param, value in params.items():
        key = param.replace("__", ".")
        if isinstance(value, tuple):  # a repeatable flag; not given: ()
            value = list(value) or None
        if value is not None and key in by_key:
            overrides[key] = (value, f"flag {by_key[key]}")
    return settings_mod.load(config_file=config_file, overrides=overrides)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an ImgdlError into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ImgdlError as exc:
            click.echo(f"imgdl: error: {exc}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


_CLI_EXAMPLES = _examples(
    "imgdl fetch urls.txt                     # download into ./images",
    "imgdl fetch --dry-run urls.csv           # check lines and settings first, offline",
    "imgdl fetch out/failures.txt -o out      # retry what failed",
    "imgdl report out                         # out/report.html: the run as charts",
    "imgdl config validate my.yaml            # every problem of a config file",
    "imgdl config show --config my.yaml       # the settings and where each came from",
    "imgdl fetch --help                       # more on one command",
)


@click.group(
    epilog=f"{_CLI_EXAMPLES}\n{EXIT_CODES_HELP}",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="imgdl")
def cli() -> None:
    """imgdl: download lists of image URLs, fast, politely, without losing any."""


_FETCH_EXAMPLES = _examples(
    "imgdl fetch urls.txt                              # into ./images",
    "imgdl fetch --dry-run urls.txt                    # counts, invalid lines, duplicates",
    "zcat list.csv.gz | imgdl fetch - --url-column image_url -o out",
    "imgdl fetch a.txt b.jsonl -o out --rate 20 --per-host-connections 4",
    "imgdl fetch pairs.parquet -o out --extra-column caption --hash-column sha256",
    "imgdl fetch out/failures.txt -o out               # retry what failed",
    "imgdl fetch urls.txt -o out --report              # also writes out/report.html",
    "imgdl fetch urls.txt -o shards --output-format webdataset --shard-samples 1000",
    "IMGDL_NETWORK_ALLOW=127.0.0.0/8 imgdl fetch local.txt   # a server on this machine",
)
_DRY_RUN_EXIT_CODES = """\b
With --dry-run, the exit code is:
  0    every line holds a URL a run would fetch (duplicates included)
  1    some lines would fail before any request: invalid URL or name, name
       collision, or an input that breaks off (the report lists the first ones)
  2    usage or configuration error, as above
"""


@cli.command(epilog=f"{_FETCH_EXAMPLES}\n{EXIT_CODES_HELP}\n{_DRY_RUN_EXIT_CODES}")
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read INPUTS and the settings as a run would and report lines, URLs to fetch, "
    "duplicates, invalid lines (file:line and why) and hosts, on stdout. No request "
    "is made and nothing is written.",
)
@_setting_options
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No summary at the end; unless --progress or --log-level say otherwise, also no "
    "progress and only warnings and errors. The exit code and OUTDIR/summary.json tell "
    "the outcome.",
)
@click.option("--report", "html_report", is_flag=True, help="Also write OUTDIR/report.html.")
@_user_errors
def fetch(
    inputs: tuple[str, ...], config_file: Path | None, dry_run: bool, quiet: bool, **params: Any
) -> None:
    """Download every URL of INPUTS (txt, csv, tsv, jsonl, optionally .gz; parquet; '-' is stdin).

    Writes the images to OUTDIR, and OUTDIR/manifest.jsonl (one record per
    input line), OUTDIR/failures.txt (failed URLs, re-feedable as input) and
    OUTDIR/summary.json.
    """
    from downloader import tasks
    from downloader.runner import Runner
    from downloader.sources import open_inputs
    from downloader.telemetry import Telemetry, configure_logging

    if quiet and params["log__progress"] is None:  # an explicit --progress keeps its lines
        params["log__progress"] = False
        if params["log__level"] is None:
            params["log__level"] = "warning"
    effective = _effective(config_file, params)
    settings = effective.settings
    configure_logging(settings.log.level, settings.log.format)
    task = tasks.resolve(settings)
    opened = open_inputs(inputs, settings.input, settings.s3)
    if dry_run:
        from downloader.dryrun import dry_run as check_offline

        report = check_offline(settings, opened, task)
        click.echo(report.text())
        sys.exit(report.exit_code)
    runner = Runner(settings, opened, task)
    with Telemetry("parent", task.index if task else None):
        exit_code, summary = runner.run()
        # the summary before the final flush, which a dead collector can stretch to 5 s
        records = runner.local_dir / runner.records_dir.relative_to(runner.outdir)
        if not quiet:
            click.echo(summary_text(summary, records), err=True)
            if runner.target is not None and runner.records_location is not None:
                click.echo(
                    f"imgdl: images in {runner.target.url}/, records in "
                    f"{runner.records_location.url}/ (uploaded from {records})",
                    err=True,
                )
        if params["html_report"]:  # not a setting: _effective passes over it
            from downloader.htmlreport import report_after_fetch

            written = report_after_fetch(records)
            if runner.records_location is not None and (records / "report.html").exists():
                try:
                    runner.upload(("report.html",))
                except ImgdlError as exc:  # as for the report itself: the exit code stays
                    written += f"\nimgdl: {exc}"
            if not quiet:
                click.echo(written, err=True)
    global fetch_finished
    fetch_finished = True
    sys.exit(exit_code)


#: A fetch ran to its end: records written and closed, pool and fork server gone
#: (``launch.main`` may then leave without the interpreter's teardown).
fetch_finished = False


@cli.command("report", short_help="Write OUTDIR/report.html: the run's numbers as charts.")
@click.argument("outdir")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the page [default: OUTDIR/report.html].",
)
@_user_errors
def report_command(outdir: str, output: Path | None) -> None:
    """Write an HTML report of the run in OUTDIR, from OUTDIR/manifest.jsonl.

    One self-contained page (inline SVG charts, no scripts, nothing loaded from
    the network): totals, failure reasons, the hosts that failed most,
    throughput over time, histograms of file sizes and dimensions.

    \b
    Examples:
      imgdl report out/                    # writes out/report.html
      imgdl report out/ -o /tmp/run.html
    """
    from downloader import objstore
    from downloader.htmlreport import write_report

    if objstore.is_s3(outdir):  # the records of an s3:// run are read where they were made
        state = objstore.default_state_dir(objstore.parse(outdir))
        raise ImgdlError(
            f"imgdl report reads a local folder; the records of a run into {outdir} are in "
            f"its state folder (--state-dir, by default {state}): imgdl report {state}"
        )
    click.echo(f"imgdl: report {write_report(Path(outdir), output)}", err=True)


@cli.command()
@click.argument("outdir")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML config file, for the s3 settings of an s3:// OUTDIR [default: $IMGDL_CONFIG].",
)
@_user_errors
def merge(outdir: str, config_file: Path | None) -> None:
    """Join the records of the tasks of a split job into OUTDIR's manifest, failures
    and summary.

    Each of N tasks (--shard-index/--shard-count, or an orchestrator's index
    variable) keeps its records in OUTDIR/tasks/task-I-of-N/. Exit 0 when every
    task finished and no line failed; 1 when some failed or a task is missing
    or unfinished (the message names it).

    \b
    Examples:
      imgdl fetch urls.txt -o out --shard-index 0 --shard-count 2
      imgdl fetch urls.txt -o out --shard-index 1 --shard-count 2
      imgdl merge out        # out/manifest.jsonl, failures.txt, summary.json
      imgdl merge s3://images/run1   # the same, read from and written to the bucket
    """
    import tempfile

    from downloader import merge as merge_mod
    from downloader import objstore

    if objstore.is_s3(outdir):
        settings = _effective(config_file, {}).settings
        with tempfile.TemporaryDirectory(prefix="imgdl-merge-") as workdir:
            summary = merge_mod.merge_bucket(outdir, settings.s3, Path(workdir))
    else:
        summary = merge_mod.merge(Path(outdir))
    click.echo(merge_mod.merge_text(summary, outdir), err=True)
    sys.exit(summary["exit_code"])


@cli.group(
    epilog=_examples(
        "imgdl config show                        # defaults, IMGDL_* variables and flags",
        "imgdl config show --config my.yaml --rate 5",
        "imgdl config validate my.yaml            # every problem, with its line",
    )
)
def config() -> None:
    """Inspect and check the settings.

    docs/configuration.md describes every key: its default, IMGDL_* variable,
    flag and meaning.
    """


@config.command(
    "show",
    epilog=_examples(
        "imgdl config show --config my.yaml",
        "IMGDL_HTTP_CONCURRENCY=32 imgdl config show --concurrency 16   # the flag wins",
        "imgdl config show | grep '^limits'",
    ),
)
@_setting_options
@_user_errors
def config_show(config_file: Path | None, **params: Any) -> None:
    """Print the effective settings and where each value came from.

    Precedence, highest first: flags, IMGDL_* environment variables, the
    config file (--config or IMGDL_CONFIG), defaults.
    """
    from downloader import tasks

    effective = _effective(config_file, params)
    width = max(len(k) for k in settings_mod.KEYS)
    task = tasks.resolve(effective.settings)  # an orchestrator's index without a count: exit 2
    resolved: dict[str, Any] = {
        "run.processes": effective.settings.processes,
        "run.shards_in_flight": effective.settings.shards_in_flight,
        **_proxies_from_env(),
    }
    if task is not None:
        resolved["run.shard_index"] = f"{task.index} (from {task.source})"
        resolved["run.shard_count"] = task.count
    for key, value, source in effective.items():
        if key == "hosts.rules":  # header values may be secrets
            value = redacted(value)
        shown = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
        if value is None and key in resolved:
            source = f"{source}: {resolved[key]}"
        click.echo(f"{key:<{width}}  {shown:<40}  # {source}")


def _proxies_from_env() -> dict[str, str]:
    """What ``network.proxy: null`` and ``network.no_proxy: null`` mean on this machine."""
    rules = ProxyRules.from_settings(None, None, os.environ)
    http, https = (p.shown if p else "none" for p in (rules.http, rules.https))
    return {
        "network.proxy": f"from the environment: http {http}, https {https}",
        "network.no_proxy": f"from the environment: {','.join(rules.no_proxy) or 'none'}",
    }


@config.command(
    "validate",
    epilog=_examples(
        "imgdl config validate my.yaml",
        "imgdl config validate my.yaml && imgdl fetch urls.txt --config my.yaml",
    )
    + """
\b
Exit codes:
  0    the file is valid (one line: FILE: OK)
  2    it has problems, or cannot be read
""",
)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def config_validate(file: Path) -> None:
    """Check a YAML config file and list every problem in it.

    Each problem is one line, FILE:LINE: KEY: what is wrong (and how to fix it),
    in the order of the file: unknown keys and sections (with the likely key),
    values of the wrong type or out of range, YAML syntax errors. The checks are
    those of every command that reads a config file; the file is checked on
    its own, without IMGDL_* variables or flags.
    """
    problems = settings_mod.validate_file(file)
    if not problems:
        click.echo(f"{file}: OK")
        return
    for problem in problems:
        click.echo(str(problem))
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    click.echo(f"imgdl: error: {file}: {count}", err=True)
    sys.exit(EXIT_USAGE)


def main() -> None:
    """Entry point: click's usage errors become one line on stderr and exit code 2."""
    try:
        result = cli.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.format_message())
        sys.exit(0)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"imgdl: error: {exc.format_message()}{hint}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"imgdl: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)
