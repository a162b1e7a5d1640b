"""Property tests: URL checks and name building never raise anything but the documented
error, and no name ever lands outside OUTDIR."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from downloader import sources
from downloader.errors import UnsafeNameError
from downloader.fetch import _AS_GIVEN, parse_url
from downloader.netpolicy import NetworkPolicy, parse_host
from downloader.outcomes import Job
from downloader.sources import InvalidUrl, check_url
from downloader.storage import safe_relpath, stem_for
from tests.conftest import read_head

ROOT = Path(tempfile.gettempdir()) / "imgdl-property-root"

url_like = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda scheme, host, path: f"{scheme}://{host}/{path}",
        st.sampled_from(["http", "https", "HTTP", "ftp", "javascript", "", "file"]),
        st.text(max_size=40),
        st.text(max_size=80),
    ),
)
name_like = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.sampled_from(
            [
                "..",
                ".",
                "",
                "a",
                "CON",
                "nul.txt",
                "x" * 260,
                "\x00",
                "/",
                "\\",
                ".imgdl",
                "previous-runs",
                "ok.jpg",
                "é",
                "a b",
                "c.",
            ]
        ),
        max_size=8,
    ).map("/".join),
)


@given(url_like)
@settings(max_examples=400)
def test_check_url_only_raises_invalid_url(raw: str) -> None:
    try:
        url = check_url(raw)
    except InvalidUrl as exc:
        assert str(exc)
        return
    assert url.lower().startswith(("http://", "https://"))


@given(name_like)
@settings(max_examples=600)
def test_safe_relpath_stays_inside(raw: str) -> None:
    try:
        rel = safe_relpath(raw)
    except UnsafeNameError:
        return
    final = os.path.realpath(os.path.join(ROOT, rel + ".jpg"))
    assert final.startswith(str(ROOT) + os.sep)
    assert "\x00" not in rel
    assert all(len(p.encode("utf-8", "surrogatepass")) <= 255 for p in rel.split("/"))


@given(url_like.filter(lambda u: u.isprintable()), st.integers(1, 10**9))
@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
def test_template_names_stay_inside(url: str, line: int) -> None:
    job = Job(url=url, input="list.txt", line=line)
    for template in ("{url_hash:.3}/{url_hash}", "{host}/{basename}", "{input}/{line}-{basename}"):
        try:
            rel = stem_for(job, template)
        except UnsafeNameError:
            continue
        final = os.path.realpath(os.path.join(ROOT, rel + ".png"))
        assert final.startswith(str(ROOT) + os.sep)


@given(st.text(max_size=60))
@settings(max_examples=400)
def test_host_checks_only_raise_the_documented_error(host: str) -> None:
    parse_host(host)  # never raises
    try:
        NetworkPolicy().check_host(host)
    except Exception as exc:
        assert type(exc).__name__ == "BlockedAddressError"


@pytest.mark.parametrize(
    "template",
    [
        "{url_hash:.3}/{url_hash}",
        "a/{line:08d}",
        "x/{url_hash:.2}/{line}",
        "a{line:/>3}_{url_hash}",
        "{url_hash:.2}/{line:#g}",
        "{line:8}",
    ],
)
@given(line=st.integers(min_value=1, max_value=10**12), path=st.text(max_size=20))
@settings(max_examples=60, deadline=None)
def test_the_fast_names_are_the_checked_names(
    tmp_path_factory: pytest.TempPathFactory, template: str, line: int, path: str
) -> None:
    """Store skips the name checks for plain templates; the names must be the ones the
    checks give (review of issue 5: fill characters and '#g' changed names)."""
    from downloader.storage import Store, stem_for

    store = Store(tmp_path_factory.mktemp("out"), template)
    job = Job(url=f"http://example.com/{quote(path)}", input="list.txt", line=line)
    try:
        expected: str | None = stem_for(job, template)
    except UnsafeNameError:
        expected = None
    try:
        got: str | None = store.stem_for(job)
    except UnsafeNameError:
        got = None
    assert got == expected


url_parts = st.builds(
    lambda scheme, host, port, rest: f"{scheme}://{host}{port}{rest}",
    st.sampled_from(["http", "https", "HTTP", "ftp"]),
    st.text(alphabet="aZ09.-_@[]:%é", max_size=12),
    st.sampled_from(["", ":", ":0", ":00", ":080", ":8a", ":65535", ":65536", ":99999"]),
    st.text(alphabet="/?#aZ.~%=&[]@:é+ ", max_size=20),
)


def _verdict(raw: str) -> str:
    """check_url's answer: the URL it keeps, or why it refuses."""
    try:
        return check_url(raw)
    except InvalidUrl as exc:
        return f"invalid: {exc}"


def _full_check(raw: str) -> str:
    """check_url as it was before its shortcut for plainly valid URLs: urlsplit always."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "_PLAINLY_VALID", re.compile(r"(?!)"))
        return _verdict(raw)


@given(st.one_of(url_parts, st.from_regex(sources._PLAINLY_VALID, fullmatch=True)))
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
def test_check_url_shortcut_answers_as_the_full_parse(raw: str) -> None:
    """Near misses of the shortcut's pattern, and inputs drawn from the pattern itself
    (the near misses alone reached the shortcut in 4 of 600 examples)."""
    assert _verdict(raw) == _full_check(raw)


@given(
    st.builds(
        lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
        st.sampled_from(["http", "https"]),
        st.text(alphabet="aZ09.-", min_size=1, max_size=10),
        st.sampled_from(["", ":80", ":443", ":8080", ":0", ":080", ":65535", ":65536", ":99999"]),
        st.text(alphabet="/?aZ09.~-_=&%+", max_size=24),
    )
)
@settings(max_examples=2000)
def test_a_url_taken_as_given_is_the_url_yarl_makes(text: str) -> None:
    """fetch.parse_url skips yarl's re-encoding only where it would change nothing."""
    try:
        full = URL(text)
    except ValueError:
        return
    url, as_given = parse_url(text)
    if as_given:
        assert str(url) == text == str(full)
        assert (url.raw_host, url.port, url.raw_path_qs) == (
            full.raw_host,
            full.port,
            full.raw_path_qs,
        )
    else:
        assert url == full


@given(st.from_regex(_AS_GIVEN, fullmatch=True))
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_url_of_the_fast_pattern_parses_as_yarl_parses_it(text: str) -> None:
    """Drives parse_url's fast path itself (the test above reaches it in about one
    example of thirty), and holds it to the full parse when that refuses too."""
    try:
        full = URL(text)
    except ValueError:
        with pytest.raises(ValueError):
            parse_url(text)
        return
    url, as_given = parse_url(text)
    assert not as_given or str(url) == text
    for name in ("raw_host", "host", "port", "raw_path_qs", "path", "query_string",
                 "fragment", "raw_user", "host_port_subcomponent"):  # fmt: skip
        assert getattr(url, name) == getattr(full, name), name
    assert url == full and str(url.join(URL("../x?y"))) == str(full.join(URL("../x?y")))


header_name = st.from_regex(rb"\A[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}\Z")
header_value = st.one_of(
    st.binary(max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v),
    st.sampled_from([b"gzip ", b"a\t", b"caf\xc3\xa9", b"\xff\xfe", b"x\x00y", b"  ", b"e\xcc"]),
)


def _head_as_parsed(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[str, str]], str | None]:
    """What the client's response holds for these header lines: the fields, or the
    refusal; the head is fed through the real connection and its llhttp parser."""
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in raw)
    read = read_head(b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 0\r\n\r\n")
    return read.headers, str(read.error) if read.error is not None else None


@given(st.lists(st.tuples(header_name, header_value), max_size=8))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_response_headers_are_read_as_each_line_alone_would_be(
    raw: list[tuple[bytes, bytes]],
) -> None:
    """The client checks and decodes a head's header lines all at once (issue 5); the
    result is what each line on its own gives: its name and value decoded (UTF-8, an
    undecodable byte kept as a surrogate), spaces and tabs at the value's ends
    dropped, and a NUL anywhere refused."""
    fields, refusal = _head_as_parsed(raw)
    if any(b"\x00" in value for _, value in raw):
        assert refusal is not None and "NUL byte" in refusal
        return
    assert refusal is None
    expected = [
        (name.decode(), value.strip(b" \t").decode("utf-8", "surrogateescape"))
        for name, value in raw
    ]
    assert fields == [*expected, ("Content-Length", "0")]


def test_a_header_line_too_long_is_refused_and_one_just_short_is_read() -> None:
    from downloader.httpclient import MAX_HEADER_LINE

    name = b"X-Long"
    fine, _ = _head_as_parsed([(name, b"v" * (MAX_HEADER_LINE - len(name)))])
    assert fine[0] == ("X-Long", "v" * (MAX_HEADER_LINE - len(name)))
    _, refusal = _head_as_parsed([(name, b"v" * (MAX_HEADER_LINE - len(name) + 1))])
    assert refusal is not None and "header line longer than" in refusal


@given(
    st.sampled_from(["http", "https", "HTTP"]),
    st.sampled_from(
        ["example.com", "Example.COM", "[::1]", "127.0.0.1", "xn--caf-dma.fr", "bücher.de"]
    ),
    st.sampled_from(["", ":80", ":443", ":8080"]),
    st.from_regex(r"\A(/[a-zA-Z0-9%._~-]{0,12}){0,3}(\?[a-z=&%0-9]{0,10})?\Z"),
)
@settings(max_examples=300)
def test_a_request_head_kept_per_origin_is_the_one_built_line_by_line(
    scheme: str, host: str, port: str, path: str
) -> None:
    """``HttpClient._request`` keeps the head of a plain request per origin (issue 5):
    for the first request there and the next, it is byte for byte the request built
    line by line."""
    import asyncio

    from downloader.httpclient import HttpClient
    from downloader.settings import Settings

    async def scenario() -> None:
        client = HttpClient(Settings(), NetworkPolicy())
        url, _ = parse_url(f"{scheme}://{host}{port}{path}")
        for _ in range(2):
            assert client._request(url, {}) == client._request_lines(url, {})

    asyncio.run(scenario())


def test_request_heads_are_kept_for_at_most_heads_kept_origins() -> None:
    import asyncio

    from downloader.httpclient import HEADS_KEPT, HttpClient
    from downloader.settings import Settings

    async def scenario() -> int:
        client = HttpClient(Settings(), NetworkPolicy())
        for port in range(1, HEADS_KEPT + 500):
            client._request(parse_url(f"http://127.0.0.1:{port}/a.jpg")[0], {})
        return len(client._heads)

    assert 0 < asyncio.run(scenario()) <= HEADS_KEPT
