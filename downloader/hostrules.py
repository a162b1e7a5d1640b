"""Headers, cookies and credentials per host (the ``hosts.rules`` settings).

Each request, and each hop of a redirect, gets the headers of the one rule that
matches its own host best; a host no rule matches gets none of them, so a token
or a cookie never follows a redirect to another host. Secrets are read here, from
environment variables and files, and are never printed: ``repr`` hides them and
every error names the variable or the file, not what it holds.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yarl import URL

from downloader.errors import ConfigError
from downloader.settings import HostAuth, HostRule, HostsSettings

if TYPE_CHECKING:  # loaded by the rules with a cookies file only (urllib.request with it)
    import http.cookiejar

REDACTED = "***"


@dataclasses.dataclass(frozen=True, repr=False)
class _Rule:
    """A rule with its secrets read: what is sent to the hosts it matches."""

    match: str
    headers: Mapping[str, str]
    cookies: tuple[http.cookiejar.Cookie, ...]
    authorization: str | None

    def __repr__(self) -> str:  # never the secrets
        return f"<host rule {self.match}>"

    def specificity(self, host: str) -> tuple[int, int] | None:
        """How closely this rule matches ``host``: exact beats the longest wildcard."""
        if self.match == host:
            return (1, len(host))
        if self.match.startswith("*.") and host.endswith(self.match[1:]):
            return (0, len(self.match))
        return None


class HostRules:
    """The rules of a run, with their secrets loaded once."""

    def __init__(self, rules: tuple[_Rule, ...] = ()) -> None:
        self._rules = rules

    def __repr__(self) -> str:
        return f"<HostRules {[r.match for r in self._rules]}>"

    def __bool__(self) -> bool:
        return bool(self._rules)

    @classmethod
    def load(cls, settings: HostsSettings, env: Mapping[str, str] | None = None) -> HostRules:
        """Read every rule's secrets and cookies; ConfigError names what is missing."""
        env = os.environ if env is None else env
        return cls(tuple(_load_rule(rule, env) for rule in settings.rules))

    def rule_for(self, host: str) -> _Rule | None:
        host = host.lower().rstrip(".")
        best: tuple[tuple[int, int], _Rule] | None = None
        for rule in self._rules:
            score = rule.specificity(host)
            if score is not None and (best is None or score > best[0]):
                best = (score, rule)
        return best[1] if best else None

    def headers_for(self, url: URL, downgraded: bool = False) -> dict[str, str]:
        """The headers of the rule for this URL's host. ``downgraded``: an earlier hop
        was https and this one is not, so no credentials and no cookies go in clear."""
        rule = self.rule_for(url.raw_host or "")
        if rule is None:
            return {}
        headers = dict(rule.headers)
        if downgraded:
            return headers
        if rule.authorization is not None:
            headers["Authorization"] = rule.authorization
        cookie = cookie_header(rule.cookies, url)
        if cookie:
            headers["Cookie"] = cookie
        return headers


def _where(rule: HostRule) -> str:
    return f"the rule for {rule.match}"


def _secret(
    rule: HostRule, what: str, name: str | None, path: Path | None, env: Mapping[str, str]
) -> str:
    """A secret from an environment variable or a file; the error says which, not what."""
    if name is not None:
        value = env.get(name, "")
        source = f"environment variable {name}"
        if not value.strip():
            raise ConfigError(
                f"{_where(rule)}: the {what} comes from {source}, which is "
                f"{'empty' if name in env else 'not set'} (export {name}=... before the run)"
            )
    else:
        assert path is not None
        source = f"file {_shown(path)}"
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(
                f"{_where(rule)}: cannot read the {what} from {source}: {why}"
            ) from None
        if not value.strip():
            raise ConfigError(f"{_where(rule)}: the {what} file {path} is empty")
    value = value.strip()
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{_where(rule)}: the {what} in {source} spans more than one line")
    return value


def _authorization(rule: HostRule, auth: HostAuth, env: Mapping[str, str]) -> str:
    if auth.type == "bearer":
        return "Bearer " + _secret(rule, "token", auth.token_env, auth.token_file, env)
    password = _secret(rule, "password", auth.password_env, auth.password_file, env)
    assert auth.username is not None
    return basic_authorization(auth.username, password)


def basic_authorization(username: str, password: str) -> str:
    """The Authorization header of basic credentials (RFC 7617, UTF-8)."""
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _shown(path: Path) -> str:
    """A file named by the config, as a message shows it: a relative path is taken
    from the current folder (not the config file's), so say where that led."""
    return str(path) if path.is_absolute() else f"{path} (= {path.absolute()})"


def _cookies(rule: HostRule, path: Path) -> tuple[http.cookiejar.Cookie, ...]:
    import http.cookiejar

    jar = http.cookiejar.MozillaCookieJar()
    try:
        with warnings.catch_warnings():  # "http.cookiejar bug!" on a short line
            warnings.simplefilter("ignore")
            jar.load(str(path), ignore_discard=True, ignore_expires=True)
    except http.cookiejar.LoadError:  # its message quotes the line: a cookie's value
        raise ConfigError(
            f"{_where(rule)}: cookies_file {path} is not a cookies file in the Netscape "
            "format (tab-separated: domain, subdomains TRUE/FALSE, path, secure TRUE/FALSE, "
            "expiry, name, value; first line '# Netscape HTTP Cookie File')"
        ) from None
    except OSError as exc:  # after LoadError, which is one
        raise ConfigError(
            f"{_where(rule)}: cannot read cookies_file {_shown(path)}: "
            f"{exc.strerror or 'unreadable'}"
        ) from None
    return tuple(sorted(jar, key=lambda c: -len(c.path)))


def _load_rule(rule: HostRule, env: Mapping[str, str]) -> _Rule:
    headers = dict(rule.headers)
    if rule.referer is not None:
        headers["Referer"] = rule.referer
    return _Rule(
        match=rule.match,
        headers=headers,
        cookies=_cookies(rule, rule.cookies_file) if rule.cookies_file else (),
        authorization=_authorization(rule, rule.auth, env) if rule.auth else None,
    )


def _path_matches(cookie_path: str, path: str) -> bool:
    if cookie_path in ("", "/") or path == cookie_path:
        return True
    prefix = cookie_path if cookie_path.endswith("/") else cookie_path + "/"
    return path.startswith(prefix)


def cookie_header(
    cookies: tuple[http.cookiejar.Cookie, ...], url: URL, now: float | None = None
) -> str:
    """The Cookie header for ``url``: the cookies whose domain, path, secure flag and
    expiry fit it (a cookie file's expiry 0 is a session cookie: always sent)."""
    now = time.time() if now is None else now
    host = (url.raw_host or "").lower().rstrip(".")
    path = url.raw_path or "/"
    picked = []
    for cookie in cookies:
        if cookie.secure and url.scheme != "https":
            continue
        if cookie.expires is not None and cookie.expires and cookie.expires <= now:
            continue
        domain = cookie.domain.lower().lstrip(".")
        if cookie.domain_specified or cookie.domain.startswith("."):
            if host != domain and not host.endswith("." + domain):
                continue
        elif host != domain:
            continue
        if not _path_matches(cookie.path, path):
            continue
        picked.append(cookie.name if cookie.value is None else f"{cookie.name}={cookie.value}")
    return "; ".join(picked)


def redacted(rules: list[Any]) -> list[Any]:
    """``hosts.rules`` as config show prints it: every header value as ***, unset keys
    left out. The rest holds no secret: variable names and file paths only."""
    out = []
    for rule in rules:
        if isinstance(rule, dict):  # unset keys left out: the line stays readable
            rule = {k: _set(v) for k, v in rule.items() if v is not None and v != {}}
            if "headers" in rule:
                rule["headers"] = dict.fromkeys(rule["headers"], REDACTED)
        out.append(rule)
    return out


def _set(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value
