"""The TLS context of a worker's connections, kept apart from aiohttp so that the
parent can check ``tls.ca_bundle`` without importing the HTTP stack."""

from __future__ import annotations

import functools
import ssl
from pathlib import Path

from downloader.errors import ConfigError
from downloader.settings import TlsSettings


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | bool:
    """Verification on, with the system's trust store plus ``tls.ca_bundle`` (file or folder).

    ``True`` (aiohttp's verified default context, made once per process) when there is
    no bundle; ``False`` only when ``tls.verify`` is false, which the parent warns about.
    """
    if not tls.verify:
        return False
    if tls.ca_bundle is None:
        return True
    return _with_bundle(tls.ca_bundle)


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context itself, for a client that takes no ``True``/``False`` (the builtin
    HTTP client): the default verified one, the one with ``tls.ca_bundle``, or, only
    when ``tls.verify`` is false, one that checks nothing."""
    configured = ssl_context(tls)
    if isinstance(configured, ssl.SSLContext):
        return configured
    return _unverified() if configured is False else _system()


@functools.lru_cache(maxsize=1)
def _system() -> ssl.SSLContext:
    return ssl.create_default_context()


@functools.lru_cache(maxsize=1)
def _unverified() -> ssl.SSLContext:
    """tls.verify: false, which the user set and the parent warned about."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=4)
def _with_bundle(bundle: Path) -> ssl.SSLContext:
    """Cached: loading the trust store takes about 40 ms, and every shard asks."""
    context = ssl.create_default_context()
    try:
        if bundle.is_dir():
            context.load_verify_locations(capath=str(bundle))
        else:
            context.load_verify_locations(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load {bundle}: {exc} (give a PEM file, or a folder prepared with "
            "`openssl rehash`)"
        ) from None
    return context
