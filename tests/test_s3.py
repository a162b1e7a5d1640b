"""s3:// output and input against a real S3 server on loopback (moto in server mode).

Every run is the real CLI in a subprocess, with the standard AWS variables
(``AWS_ENDPOINT_URL`` picks the local server). The network policy of these runs
allows 127.0.0.1/32 only (the image server); the store is on 127.0.0.2, which the
store's own client reaches all the same.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from downloader.devserver import DevServer
from downloader.errors import ConfigError
from downloader.objstore import S3Location, parse, shared_profile
from downloader.storage import url_hash
from tests.conftest import clean_env, read_manifest, read_summary, run_cli, write_list
from tests.s3server import CREDENTIALS, MotoServer, S3Proxy

_buckets = itertools.count()
RECORDS = {"manifest.jsonl", "failures.txt", "summary.json", ".imgdl/run.json"}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@dataclass
class S3:
    proxy: S3Proxy
    client: Any  # boto3's S3 client, straight to moto
    bucket: str
    env: dict[str, str]

    def keys(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix/`` with its bytes, by key relative to it."""
        found: dict[str, bytes] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix + "/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                body = self.client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                found[item["Key"][len(prefix) + 1 :]] = body
        return found

    def images(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.keys(prefix).items() if k not in RECORDS}

    def image_puts(self, prefix: str) -> list[str]:
        """PUT requests of images (not records) below ``prefix`` seen by the proxy."""
        base = f"/{self.bucket}/{prefix}/"
        return [p for p in self.proxy.puts(base) if p[len(base) :] not in RECORDS]


@pytest.fixture
def s3(moto: MotoServer, tmp_path: Path) -> Iterator[S3]:
    bucket = f"imgdl-test-{next(_buckets)}"
    client = moto.client()
    client.create_bucket(Bucket=bucket)
    proxy = S3Proxy(moto.url).start()
    env = clean_env(
        **CREDENTIALS,
        AWS_ENDPOINT_URL=proxy.url,
        HOME=str(tmp_path),  # no ~/.aws of the machine
        IMGDL_NETWORK_ALLOW="[127.0.0.1/32]",  # the images' server; not the store's address
        IMGDL_S3_RETRIES="1",
    )
    try:
        yield S3(proxy, client, bucket, env)
    finally:
        proxy.stop()


def _image_hits(server: DevServer) -> int:
    return sum(1 for _, _, path in server.requests if path.startswith("/i/"))


@pytest.mark.slow
def test_full_run_then_resume_skips_every_object(server: DevServer, s3: S3, tmp_path: Path) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(40)]
    listing = write_list(tmp_path / "urls.txt", urls)
    state = tmp_path / "state"
    command = ("fetch", str(listing), "-o", f"s3://{s3.bucket}/run/one", "--state-dir", str(state))
    result = run_cli(*command, env=s3.env)
    assert result.returncode == 0, result.stderr
    assert f"s3://{s3.bucket}/run/one" in result.stderr

    records = read_manifest(state)
    assert [r["status"] for r in records] == ["saved"] * 40
    objects = s3.keys("run/one")
    images = {k: v for k, v in objects.items() if k not in RECORDS}
    assert sorted(images) == sorted(r["path"] for r in records)
    for record in records:
        n = int(record["url"].rsplit("/", 1)[1].split(".")[0])
        body, _ = server.image(n)
        assert images[record["path"]] == body
        assert hashlib.sha256(body).hexdigest() == record["sha256"]
        head = s3.client.head_object(Bucket=s3.bucket, Key=f"run/one/{record['path']}")
        assert head["ContentType"] == record["content_type"]
        assert record["path"].startswith(url_hash(record["url"])[:3] + "/")
    # the records went up too, the same as the local ones
    assert set(objects) >= RECORDS
    assert objects["manifest.jsonl"] == (state / "manifest.jsonl").read_bytes()
    assert json.loads(objects["summary.json"])["saved"] == 40
    assert s3.image_puts("run/one") and len(s3.image_puts("run/one")) == 40

    # The same command again: nothing fetched, nothing uploaded, every line carried over.
    hits = _image_hits(server)
    s3.proxy.requests.clear()
    result = run_cli(*command, env=s3.env)
    assert result.returncode == 0, result.stderr
    assert _image_hits(server) == hits
    assert s3.image_puts("run/one") == []
    summary = read_summary(state)
    assert summary["this_run"]["resumed_lines"] == 40
    assert summary["saved"] == 40 and len(read_manifest(state)) == 40

    # A new machine: the local state is gone. The bucket's records come back.
    shutil.rmtree(state)
    result = run_cli(*command, env=s3.env)
    assert result.returncode == 0, result.stderr
    assert _image_hits(server) == hits
    assert s3.image_puts("run/one") == []
    assert read_summary(state)["this_run"]["resumed_lines"] == 40

    # An object deleted behind imgdl's back is fetched and uploaded again, alone.
    gone = records[7]
    s3.client.delete_object(Bucket=s3.bucket, Key=f"run/one/{gone['path']}")
    result = run_cli(*command, env=s3.env)
    assert result.returncode == 0, result.stderr
    assert _image_hits(server) == hits + 1
    assert [p.rsplit("/", 1)[1] for p in s3.image_puts("run/one")] == [
        gone["path"].rsplit("/", 1)[1]
    ]
    assert s3.images("run/one")[gone["path"]] == images[gone["path"]]


def test_a_split_job_into_a_bucket_is_merged_there(
    server: DevServer, s3: S3, tmp_path: Path
) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(30)] + [f"{server.url}/status/404/1"]
    listing = write_list(tmp_path / "urls.txt", urls)
    target = f"s3://{s3.bucket}/job"
    for index in range(2):  # two tasks, as on two machines: each its own state folder
        result = run_cli(
            "fetch",
            str(listing),
            "-o",
            target,
            "--state-dir",
            str(tmp_path / f"state{index}"),
            "--shard-index",
            str(index),
            "--shard-count",
            "2",
            env=s3.env,
        )
        assert result.returncode in (0, 1), result.stderr
    merged = run_cli("merge", target, env=s3.env)
    assert merged.returncode == 1, merged.stderr  # the 404
    assert "merged 2 of 2 tasks: 31 lines, 30 saved" in merged.stderr
    assert f"{target}/manifest.jsonl" in merged.stderr
    objects = s3.keys("job")
    manifest = [json.loads(line) for line in objects["manifest.jsonl"].decode().splitlines()]
    assert sorted(r["line"] for r in manifest) == list(range(1, 32))
    summary = json.loads(objects["summary.json"])
    assert summary["tasks"] == {"count": 2, "merged": 2, "unfinished": {}}
    assert objects["failures.txt"].decode().split() == [f"{server.url}/status/404/1"]
    images = {k for k in s3.images("job") if not k.startswith("tasks/")}
    assert len(images) == 30
    for index in range(2):  # each task's own records are kept beside the merged ones
        assert f"tasks/task-{index:05d}-of-00002/manifest.jsonl" in objects


@pytest.mark.slow
def test_failed_upload_is_recorded_and_retried_by_the_next_run(
    server: DevServer, s3: S3, tmp_path: Path
) -> None:
    urls = [f"{server.url}/i/{n}.jpg" for n in range(20)]
    refused = {url_hash(u) for u in urls[::5]}  # 4 of 20: the store answers 503 to each try
    s3.proxy.fail = lambda method, path: method == "PUT" and any(h in path for h in refused)
    listing = write_list(tmp_path / "urls.txt", urls)
    state = tmp_path / "state"
    command = ("fetch", str(listing), "-o", f"s3://{s3.bucket}/p", "--state-dir", str(state))
    result = run_cli(*command, env=s3.env)
    assert result.returncode == 1, result.stderr

    records = {r["url"]: r for r in read_manifest(state)}
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert {url_hash(r["url"]) for r in failed} == refused
    for record in failed:
        assert record["reason"] == "upload_error"
        assert record["http_status"] == 200  # the image itself was fine
        assert "503" in record["error"] and f"s3://{s3.bucket}/p/" in record["error"]
        assert record["path"] is None and record["attempts"] == 1
    # 1 try + 1 retry (IMGDL_S3_RETRIES=1) of each refused upload, nothing more
    assert s3.proxy.failed == 2 * len(refused)
    images = s3.images("p")
    assert len(images) == 16
    assert not any(h in key for key in images for h in refused)
    failures = (state / "failures.txt").read_text().split()
    assert sorted(failures) == sorted(r["url"] for r in failed)
    assert json.loads(s3.keys("p")["summary.json"])["by_reason"] == {"upload_error": 4}

    # The store is well again: the same command uploads the four, and only them.
    s3.proxy.fail = lambda method, path: False
    s3.proxy.requests.clear()
    result = run_cli(*command, env=s3.env)
    assert result.returncode == 0, result.stderr
    assert len(s3.image_puts("p")) == 4
    assert len(s3.images("p")) == 20
    assert read_summary(state)["saved"] == 20


def test_large_body_goes_up_in_parts(s3: S3, tmp_path: Path) -> None:
    big = b"\xff\xd8\xff\xe0" + bytes(16) + hashlib.sha256(b"x").digest() * (6 << 15)  # ~6 MiB
    with DevServer(bodies={"big": (big, "image/jpeg")}) as server:
        listing = write_list(tmp_path / "urls.txt", [f"{server.url}/body/big"])
        env = {**s3.env, "IMGDL_S3_PART_SIZE": str(5 << 20)}
        result = run_cli(
            "fetch", str(listing), "-o", f"s3://{s3.bucket}/big", "--state-dir",
            str(tmp_path / "state"), env=env,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (record,) = read_manifest(tmp_path / "state")
    assert s3.images("big") == {record["path"]: big}
    parts = [q for m, _, q in s3.proxy.requests if m == "PUT" and "partNumber=" in q]
    assert len(parts) == 2  # 5 MiB + the rest, completed by one POST
    assert any(m == "POST" and "uploadId=" in q for m, _, q in s3.proxy.requests)
    assert not list((tmp_path / "state" / ".imgdl").glob("parts/*/*"))  # spool removed


def test_input_lists_are_read_from_the_bucket(server: DevServer, s3: S3, tmp_path: Path) -> None:
    text = "".join(f"{server.url}/i/{n}.jpg\n" for n in range(10))
    s3.client.put_object(Bucket=s3.bucket, Key="lists/a.txt.gz", Body=gzip.compress(text.encode()))
    table = "name,url\n" + "".join(f"n{n},{server.url}/i/{n}.jpg\n" for n in range(10, 15))
    s3.client.put_object(Bucket=s3.bucket, Key="lists/b.csv", Body=table.encode())
    inputs = (f"s3://{s3.bucket}/lists/a.txt.gz", f"s3://{s3.bucket}/lists/b.csv")
    out = tmp_path / "out"
    result = run_cli("fetch", *inputs, "-o", str(out), env=s3.env)
    assert result.returncode == 0, result.stderr
    records = read_manifest(out)
    assert [(r["input"], r["line"]) for r in records if r["input"] == inputs[0]] == [
        (inputs[0], n) for n in range(1, 11)
    ]
    assert sum(r["input"] == inputs[1] for r in records) == 5
    assert all(r["status"] == "saved" for r in records)
    # the same lists (size and ETag): resumed, nothing fetched again
    hits = _image_hits(server)
    result = run_cli("fetch", *inputs, "-o", str(out), env=s3.env)
    assert result.returncode == 0, result.stderr
    assert _image_hits(server) == hits
    assert read_summary(out)["this_run"]["resumed_lines"] == 15

    missing = run_cli("fetch", f"s3://{s3.bucket}/lists/nope.txt", "-o", str(out), env=s3.env)
    assert missing.returncode == 2
    assert "no such object" in missing.stderr and "Traceback" not in missing.stderr


def test_a_bucket_that_does_not_exist_stops_the_run_before_it_starts(
    s3: S3, tmp_path: Path
) -> None:
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/i/1.jpg"])
    result = run_cli("fetch", str(listing), "-o", "s3://no-such-bucket/x", env=s3.env, cwd=tmp_path)
    assert result.returncode == 2
    # the default local state folder (./imgdl-state/BUCKET/PREFIX) is not left behind empty
    assert not (tmp_path / "imgdl-state").exists()
    assert "cannot list s3://no-such-bucket/x" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # what to do, not the XML header the store's answer starts with
    assert "the bucket does not exist: create it" in result.stderr, result.stderr
    assert "<?xml" not in result.stderr


def test_a_store_that_cannot_be_reached_says_where_to_look(tmp_path: Path) -> None:
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/i/1.jpg"])
    env = clean_env(
        **CREDENTIALS,
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        HOME=str(tmp_path),
        IMGDL_S3_RETRIES="0",
        IMGDL_S3_TIMEOUT="2",
    )
    result = run_cli("fetch", str(listing), "-o", "s3://some-bucket/x", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "check AWS_ENDPOINT_URL" in result.stderr, result.stderr
    assert not (tmp_path / "imgdl-state").exists()


def test_report_on_a_bucket_points_at_the_local_records(tmp_path: Path) -> None:
    result = run_cli("report", "s3://images/run1")
    assert result.returncode == 2
    assert "imgdl report imgdl-state/images/run1" in result.stderr
    assert "s3:/images" not in result.stderr


def test_without_the_s3_client_the_error_says_what_to_install(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "obstore"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('obstore is not installed (test)')\n")
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/i/1.jpg"])
    env = clean_env(PYTHONPATH=str(tmp_path / "site"))
    result = run_cli("fetch", str(listing), "-o", "s3://some-bucket/x", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "pip install 'imgdl[s3]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket-a", S3Location("bucket-a", "")),
        ("s3://bucket-a/", S3Location("bucket-a", "")),
        ("S3://bucket-a//x/y/", S3Location("bucket-a", "x/y")),
    ],
)
def test_locations(text: str, expected: S3Location) -> None:
    assert parse(text) == expected
    assert expected.key("a/b.jpg") == "/".join(p for p in (expected.prefix, "a/b.jpg") if p)


@pytest.mark.parametrize("text", ["s3://", "s3://B", "s3://ab", "s3://bucket-a/x/../y"])
def test_bad_locations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse(text)


def test_bad_output_location_is_a_config_error(tmp_path: Path) -> None:
    result = run_cli("fetch", "-", "-o", "s3://Bad_Bucket/x", stdin=b"")
    assert result.returncode == 2
    assert "output.dir" in result.stderr and "bucket name" in result.stderr


def test_shared_profile_fills_in_only_where_the_chain_would_reach_it(tmp_path: Path) -> None:
    aws = tmp_path / ".aws"
    aws.mkdir()
    (aws / "credentials").write_text(
        "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n"
        "[work]\naws_access_key_id = WK\naws_secret_access_key = WS\naws_session_token = T\n"
    )
    (aws / "config").write_text(
        "[default]\nregion = eu-west-1\n[profile work]\nregion = sa-east-1\n"
    )
    home = {"HOME": str(tmp_path)}
    assert shared_profile(home) == {
        "access_key_id": "AK",
        "secret_access_key": "SK",
        "region": "eu-west-1",
    }
    assert shared_profile({**home, "AWS_PROFILE": "work"}) == {
        "access_key_id": "WK",
        "secret_access_key": "WS",
        "session_token": "T",
        "region": "sa-east-1",
    }
    # keys in the environment, or a web identity, come first in the AWS chain
    assert shared_profile({**home, "AWS_ACCESS_KEY_ID": "E"}) == {"region": "eu-west-1"}
    assert shared_profile({**home, "AWS_WEB_IDENTITY_TOKEN_FILE": "/t"}) == {"region": "eu-west-1"}
