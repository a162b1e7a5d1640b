"""Headers, cookies and credentials per host, through the real CLI against real
servers on 127.0.0.1 and 127.0.0.2 (two hosts, both loopback)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from yarl import URL

from downloader.devserver import DevServer
from downloader.errors import ConfigError
from downloader.hostrules import HostRules, cookie_header
from downloader.settings import HostsSettings
from tests.conftest import clean_env, read_manifest, run_cli, write_list

TOKEN = "s3cr3t-bearer-4f1d9a"
PASSWORD = "s3cr3t-pass-77c2e0"
COOKIE_VALUE = "s3cr3t-cookie-a9b8c7"
API_KEY = "s3cr3t-apikey-0e5d1b"
SECRETS = (TOKEN, PASSWORD, COOKIE_VALUE, API_KEY)


@pytest.fixture
def other() -> Iterator[DevServer]:
    """A second host: 127.0.0.2."""
    with DevServer(host="127.0.0.2") as srv:
        yield srv


def _secure(server: DevServer) -> DevServer:
    server.bearer_token = TOKEN
    server.basic_auth = ("alice", PASSWORD)
    server.cookie = f"session={COOKIE_VALUE}"
    return server


def _cookies_file(path: Path, domain: str) -> Path:
    far = int(time.time()) + 86400
    below = "TRUE" if domain.startswith(".") else "FALSE"  # for the hosts below domain too
    rows = [
        (domain, below, "/", "FALSE", far, "session", COOKIE_VALUE),
        (domain, below, "/", "FALSE", 1, "expired", "old"),  # expired: not sent
        (domain, below, "/", "TRUE", far, "secure_only", "x"),  # https only: not sent
        (domain, below, "/elsewhere", "FALSE", far, "other_path", "y"),  # other path
    ]
    lines = ["# Netscape HTTP Cookie File"] + ["\t".join(map(str, row)) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


def _fetch(tmp_path: Path, urls: list[str], *args: str, **env: str) -> list[dict[str, object]]:
    tmp_path.mkdir(exist_ok=True)
    listing = write_list(tmp_path / "urls.txt", urls)
    out = tmp_path / "out"
    result = run_cli("fetch", str(listing), "-o", str(out), *args, env=clean_env(**env))
    assert result.returncode in (0, 1), result.stderr
    return read_manifest(out)


def test_bearer_token_401_without_200_with(server: DevServer, tmp_path: Path) -> None:
    _secure(server)
    url = f"{server.url}/auth/bearer/1"
    (without,) = _fetch(tmp_path / "a", [url])
    assert (without["status"], without["http_status"]) == ("failed", 401)
    config = _config(
        tmp_path / "c.yaml",
        "hosts:\n  rules:\n    - match: 127.0.0.1\n"
        "      auth: {type: bearer, token_env: TEST_HOST_TOKEN}\n",
    )
    (with_token,) = _fetch(tmp_path / "b", [url], "--config", str(config), TEST_HOST_TOKEN=TOKEN)
    assert (with_token["status"], with_token["http_status"]) == ("saved", 200)


def test_basic_password_from_a_file(server: DevServer, tmp_path: Path) -> None:
    _secure(server)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    config = _config(
        tmp_path / "c.yaml",
        "hosts:\n  rules:\n    - match: 127.0.0.1\n"
        f"      auth: {{type: basic, username: alice, password_file: {secret}}}\n",
    )
    (record,) = _fetch(tmp_path, [f"{server.url}/auth/basic/1"], "--config", str(config))
    assert (record["status"], record["http_status"]) == ("saved", 200)


def test_redirect_to_another_host_gets_no_credentials(
    server: DevServer, other: DevServer, tmp_path: Path
) -> None:
    _secure(server)
    _secure(other)
    cookies = _cookies_file(tmp_path / "cookies.txt", "127.0.0.1")
    config = _config(
        tmp_path / "c.yaml",
        "hosts:\n  rules:\n    - match: 127.0.0.1\n"
        "      auth: {type: bearer, token_env: TEST_HOST_TOKEN}\n"
        f"      cookies_file: {cookies}\n"
        "      referer: https://origin.example/\n"
        f"      headers: {{X-Api-Key: {API_KEY}}}\n",
    )
    urls = [
        f"{server.url}/redirect?to={other.url}/i/1.jpg",  # followed: the image, no token
        f"{server.url}/redirect?to={other.url}/auth/bearer/2",  # the token stays behind: 401
        f"{server.url}/redirect?to={server.url}/auth/bearer/3",  # same host: sent again
    ]
    records = _fetch(tmp_path, urls, "--config", str(config), TEST_HOST_TOKEN=TOKEN)
    by_url = {r["url"]: (r["status"], r["http_status"]) for r in records}
    assert by_url == {
        urls[0]: ("saved", 200),
        urls[1]: ("failed", 401),
        urls[2]: ("saved", 200),
    }
    # the first hop, to the rule's host, carried everything...
    for path, authorization, cookie, referer in server.credentials_seen:
        assert authorization == f"Bearer {TOKEN}", path
        assert cookie == f"session={COOKIE_VALUE}", path
        assert referer == "https://origin.example/", path
    # ...the other host got none of it
    assert len(other.credentials_seen) == 2
    for path, authorization, cookie, referer in other.credentials_seen:
        assert (authorization, cookie, referer) == ("", "", ""), path
    assert not any(TOKEN in str(r) for r in other.requests)


def test_cookie_protected_image(server: DevServer, tmp_path: Path) -> None:
    _secure(server)
    url = f"{server.url}/cookie/1"
    (without,) = _fetch(tmp_path / "a", [url])
    assert (without["status"], without["http_status"]) == ("failed", 403)
    cookies = _cookies_file(tmp_path / "cookies.txt", "127.0.0.1")
    config = _config(
        tmp_path / "c.yaml",
        f"hosts:\n  rules:\n    - {{match: 127.0.0.1, cookies_file: {cookies}}}\n",
    )
    (with_cookie,) = _fetch(tmp_path / "b", [url], "--config", str(config))
    assert (with_cookie["status"], with_cookie["http_status"]) == ("saved", 200)
    # only the cookie that fits: not the expired one, the https-only one, another path's
    assert server.credentials_seen[-1][2] == f"session={COOKIE_VALUE}"


def test_no_secret_in_manifest_logs_or_config_show(
    server: DevServer, other: DevServer, tmp_path: Path
) -> None:
    _secure(server)
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    cookies = _cookies_file(tmp_path / "cookies.txt", "127.0.0.1")
    config = _config(
        tmp_path / "c.yaml",
        "hosts:\n  rules:\n"
        "    - match: 127.0.0.1\n"
        "      auth: {type: bearer, token_env: TEST_HOST_TOKEN}\n"
        f"      cookies_file: {cookies}\n"
        f"      headers: {{X-Api-Key: {API_KEY}}}\n"
        "    - match: '*.example.com'\n"
        f"      auth: {{type: basic, username: alice, password_file: {password}}}\n",
    )
    listing = write_list(
        tmp_path / "urls.txt",
        [
            f"{server.url}/auth/bearer/1",
            f"{server.url}/cookie/2",
            f"{server.url}/status/401/3",
            f"{server.url}/redirect?to={other.url}/auth/bearer/4",
            f"{server.url}/truncated/5",
        ],
    )
    out = tmp_path / "out"
    env = clean_env(TEST_HOST_TOKEN=TOKEN)
    common = ("--config", str(config), "--log-level", "debug")
    fetched = run_cli("fetch", str(listing), "-o", str(out), *common, "--report", env=env)
    assert fetched.returncode == 1, fetched.stderr  # some failed, on purpose
    assert any(r["status"] == "saved" for r in read_manifest(out))
    shown = run_cli("config", "show", *common, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "TEST_HOST_TOKEN" in shown.stdout and "***" in shown.stdout
    report = run_cli("report", str(out), env=env)
    texts = {
        "fetch stdout": fetched.stdout,
        "fetch stderr": fetched.stderr,
        "config show": shown.stdout + shown.stderr,
        "report": report.stdout + report.stderr,
    }
    for file in out.rglob("*"):
        if file.is_file():
            texts[str(file)] = file.read_bytes().decode("latin-1")
    leaks = [(where, s) for where, text in texts.items() for s in SECRETS if s in text]
    assert leaks == []


def test_a_secret_written_in_the_file_is_refused(tmp_path: Path) -> None:
    config = _config(
        tmp_path / "c.yaml",
        f"hosts:\n  rules:\n    - match: 127.0.0.1\n      auth: {{type: bearer, token: {TOKEN}}}\n",
    )
    result = run_cli("config", "validate", str(config))
    assert result.returncode != 0
    assert "token_env or token_file" in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr
    header = _config(
        tmp_path / "h.yaml",
        f"hosts:\n  rules:\n    - {{match: 127.0.0.1, headers: {{Authorization: {TOKEN}}}}}\n",
    )
    result = run_cli("config", "validate", str(header))
    assert result.returncode != 0 and "auth" in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_a_missing_variable_is_named(server: DevServer, tmp_path: Path) -> None:
    config = _config(
        tmp_path / "c.yaml",
        "hosts:\n  rules:\n    - match: 127.0.0.1\n"
        "      auth: {type: bearer, token_env: TEST_NO_SUCH_TOKEN}\n",
    )
    listing = write_list(tmp_path / "u.txt", [f"{server.url}/i/1.jpg"])
    result = run_cli("fetch", str(listing), "-o", str(tmp_path / "o"), "--config", str(config))
    assert result.returncode != 0
    assert "TEST_NO_SUCH_TOKEN" in result.stderr and "not set" in result.stderr
    assert server.requests == []


def _rules(*matches: str) -> HostRules:
    settings = HostsSettings.model_validate(
        {"rules": [{"match": m, "referer": m} for m in matches]}
    )
    return HostRules.load(settings, env={})


@pytest.mark.parametrize(
    ("host", "winner"),
    [
        ("img.cdn.example.com", "img.cdn.example.com"),
        ("IMG.CDN.EXAMPLE.COM", "img.cdn.example.com"),
        ("a.cdn.example.com", "*.cdn.example.com"),
        ("a.b.example.com", "*.example.com"),
        ("example.com", None),  # *.example.com is for the hosts below it
        ("badexample.com", None),
        ("example.org", None),
    ],
)
def test_the_most_specific_rule_wins(host: str, winner: str | None) -> None:
    rules = _rules("*.example.com", "img.cdn.example.com", "*.cdn.example.com")
    rule = rules.rule_for(host)
    assert (rule.match if rule else None) == winner
    assert rules.headers_for(URL(f"https://{host}/x")).get("Referer") == winner


def test_cookies_fit_domain_path_secure_and_expiry(tmp_path: Path) -> None:
    cookies = _cookies_file(tmp_path / "c.txt", ".example.com")
    settings = HostsSettings.model_validate(
        {"rules": [{"match": "*.example.com", "cookies_file": str(cookies)}]}
    )
    rule = HostRules.load(settings, env={}).rule_for("a.example.com")
    assert rule is not None
    jar = rule.cookies
    got = cookie_header(jar, URL("http://a.example.com/elsewhere/x"))
    assert got == f"other_path=y; session={COOKIE_VALUE}"
    got = cookie_header(jar, URL("https://a.example.com/"))
    assert got == f"session={COOKIE_VALUE}; secure_only=x"
    assert cookie_header(jar, URL("https://a.example.org/")) == ""
    assert COOKIE_VALUE not in repr(rule)


def test_an_unreadable_cookies_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# Netscape HTTP Cookie File\nnot a cookie line {COOKIE_VALUE}\n")
    settings = HostsSettings.model_validate({"rules": [{"match": "a", "cookies_file": str(bad)}]})
    with pytest.raises(ConfigError) as caught:
        HostRules.load(settings, env={})
    assert str(bad) in str(caught.value) and COOKIE_VALUE not in str(caught.value)


def test_a_relative_cookies_file_says_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = HostsSettings.model_validate({"rules": [{"match": "a", "cookies_file": "c.txt"}]})
    with pytest.raises(ConfigError) as caught:
        HostRules.load(settings, env={})
    assert f"c.txt (= {tmp_path / 'c.txt'})" in str(caught.value)


def test_no_credentials_after_a_redirect_from_https_to_http(
    server: DevServer, tmp_path: Path
) -> None:
    _secure(server)
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    cookies = _cookies_file(tmp_path / "cookies.txt", "127.0.0.1")
    config = _config(
        tmp_path / "c.yaml",
        f"tls: {{ca_bundle: {bundle}}}\n"
        "hosts:\n  rules:\n    - match: 127.0.0.1\n"
        "      auth: {type: bearer, token_env: TEST_HOST_TOKEN}\n"
        f"      cookies_file: {cookies}\n",
    )
    with DevServer(ssl_context=context) as secure:
        _secure(secure)
        url = f"{secure.url}/redirect?to={server.url}/auth/bearer/1"  # same host, in clear
        (record,) = _fetch(tmp_path, [url], "--config", str(config), TEST_HOST_TOKEN=TOKEN)
        assert [(a, c) for _, a, c, _ in secure.credentials_seen] == [
            (f"Bearer {TOKEN}", f"session={COOKIE_VALUE}; secure_only=x")  # https: both
        ]
    assert (record["status"], record["http_status"]) == ("failed", 401)
    assert [(a, c) for _, a, c, _ in server.credentials_seen] == [("", "")]
