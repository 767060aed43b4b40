"""weightsync's own S3 client (sources/s3api.py): signing, settings, credentials, proxies, odd replies.

The signature is checked against botocore's signer, an independent implementation; the settings against
the AWS files and variables a user writes; the rest against real servers on loopback (SeaweedFS, tinyproxy)
or, where a behaviour is AWS's alone (a region redirect) or a broken server's, a small stdlib HTTP server
that answers exactly that way.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import os
import ssl
import threading
import unittest.mock
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.helpers import error_line, weightsync
from tests.support.tinyproxy import tinyproxy as running_tinyproxy
from weightsync.errors import SourceError
from weightsync.sources import Selection
from weightsync.sources.s3 import S3Source
from weightsync.sources.s3api import Credentials, S3Api, S3Settings, canonical_query, quote_path, sign

NOW = datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=datetime.UTC)


@pytest.mark.parametrize("token", ["", "FwoGZXIvYXdzE/session+token="])
@pytest.mark.parametrize("key", ["models/llama/model-00001-of-00004.safetensors", "odd keys/wëights+(1)~ä&=.bin"])
def test_signature_matches_botocores_signer(key, token):
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotocoreCredentials

    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    query = {"list-type": "2", "prefix": "a b/c+d=e", "encoding-type": "url", "attributes": ""}
    headers = {"range": "bytes=0-99", "if-match": '"abc"', "x-amz-checksum-mode": "ENABLED"}
    path = quote_path(f"/bucket/{key}")
    ours = sign("GET", "s3.eu-west-1.amazonaws.com", path, query, headers, "eu-west-1", credentials, NOW)
    request = AWSRequest("GET", f"https://s3.eu-west-1.amazonaws.com{path}?{canonical_query(query)}",
                         headers={**headers, "X-Amz-Content-SHA256": ours["x-amz-content-sha256"]})
    signer = S3SigV4Auth(BotocoreCredentials(credentials.access_key, credentials.secret_key, token or None), "s3",
                         "eu-west-1")
    with unittest.mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]


def settings_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: str = "", style: str = "auto",
                  **env: str) -> S3Settings:
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    (tmp_path / "config").write_text(config)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return S3Settings.from_environment(style)


def test_settings_come_from_the_profile_in_the_aws_config_file(monkeypatch, tmp_path):
    config = ("[profile minio]\nregion = eu-central-1\nendpoint_url = http://minio.internal:9000\n"
              "ca_bundle = ~/ca.pem\ns3 =\n    addressing_style = path\n")
    settings = settings_from(monkeypatch, tmp_path, config, AWS_PROFILE="minio")
    assert (settings.region, settings.endpoint, settings.addressing_style) == (
        "eu-central-1", "http://minio.internal:9000", "path")
    assert settings.ca_bundle.endswith("/ca.pem") and not settings.ca_bundle.startswith("~")
    assert settings_from(monkeypatch, tmp_path, config, AWS_PROFILE="minio", AWS_REGION="us-west-2",
                         AWS_ENDPOINT_URL_S3="https://s3.example").endpoint == "https://s3.example"


def test_services_section_and_ignore_configured_endpoints(monkeypatch, tmp_path):
    config = "[default]\nservices = local\n[services local]\ns3 =\n    endpoint_url = http://127.0.0.1:9000\n"
    assert settings_from(monkeypatch, tmp_path, config).endpoint == "http://127.0.0.1:9000"
    ignored = settings_from(monkeypatch, tmp_path, config, AWS_IGNORE_CONFIGURED_ENDPOINT_URLS="true")
    assert ignored.endpoint == "https://s3.us-east-1.amazonaws.com" and not ignored.custom_endpoint


def test_aws_endpoints_by_region_fips_and_dualstack(monkeypatch, tmp_path):
    assert settings_from(monkeypatch, tmp_path, AWS_REGION="cn-north-1").endpoint == \
        "https://s3.cn-north-1.amazonaws.com.cn"
    assert settings_from(monkeypatch, tmp_path, AWS_DEFAULT_REGION="us-gov-west-1", AWS_USE_FIPS_ENDPOINT="true",
                         AWS_USE_DUALSTACK_ENDPOINT="true").endpoint == \
        "https://s3-fips.dualstack.us-gov-west-1.amazonaws.com"


@pytest.mark.parametrize(("endpoint", "bucket", "style", "expected"), [
    ("", "models", "auto", ("models.s3.us-east-1.amazonaws.com", "/w.bin")),
    ("", "my.dotted.bucket", "auto", ("s3.us-east-1.amazonaws.com", "/my.dotted.bucket/w.bin")),
    ("", "Upper_Case", "auto", ("s3.us-east-1.amazonaws.com", "/Upper_Case/w.bin")),
    ("http://127.0.0.1:8333", "models", "auto", ("127.0.0.1", "/models/w.bin")),
    ("http://localhost:9000", "models", "auto", ("localhost", "/models/w.bin")),
    ("http://minio:9000", "models", "auto", ("models.minio", "/w.bin")),
    ("http://minio:9000", "models", "path", ("minio", "/models/w.bin")),
    ("http://127.0.0.1:9000/base/", "models", "virtual", ("models.127.0.0.1", "/base/w.bin")),
])
def test_addressing_style_puts_the_bucket_in_the_host_or_the_path(monkeypatch, tmp_path, endpoint, bucket, style,
                                                                   expected):
    env = {"AWS_ENDPOINT_URL": endpoint} if endpoint else {}
    api = S3Api(settings_from(monkeypatch, tmp_path, style=style, **env), 1, 1, 1)
    _, host, _, path = api._url(bucket, "w.bin")
    assert (host, path) == expected


# ----------------------------------------------------------------------------- against SeaweedFS


@pytest.fixture
def small_model(s3_server, bucket) -> str:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b'{"model_type": "tiny"}')
    client.put_object(Bucket=bucket, Key="m/odd name+(1).bin", Body=b"weights" * 1000)
    return f"s3://{bucket}/m"


def test_credentials_from_a_profile_in_the_shared_credentials_file(small_model, s3_server, s3_env, tmp_path):
    """Not in the environment: awscrt's chain reads the profile (as botocore's would)."""
    (tmp_path / "credentials").write_text(f"[models-reader]\naws_access_key_id = {s3_server.access_key}\n"
                                          f"aws_secret_access_key = {s3_server.secret_key}\n")
    env = {k: v for k, v in s3_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_PROFILE": "models-reader",
                "AWS_CONFIG_FILE": str(tmp_path / "no-config")})
    result = weightsync("sync", "--source", small_model, "--dest", str(tmp_path / "vol"), env=env)
    assert result.returncode == 0, result.stderr
    assert (Path(result.stdout.splitlines()[-1]) / "odd name+(1).bin").read_bytes() == b"weights" * 1000


def test_no_credentials_is_one_clear_line_and_exit_3(small_model, s3_env, tmp_path):
    env = {k: v for k, v in s3_env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)})
    result = weightsync("sync", "--source", small_model, "--dest", str(tmp_path / "vol"), env=env)
    assert result.returncode == 3, result.stderr
    assert "no AWS credentials found; set AWS_ACCESS_KEY_ID" in error_line(result)
    assert "Traceback" not in result.stderr and not any((tmp_path / "vol").glob("*/current"))


def test_wrong_secret_is_access_denied_with_the_servers_code(small_model, s3_env, tmp_path):
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    result = weightsync("sync", "--source", small_model, "--dest", str(tmp_path / "vol"), env=env)
    assert result.returncode == 3, result.stderr
    assert "access denied (SignatureDoesNotMatch)" in error_line(result)


@pytest.fixture
def tinyproxy(tmp_path) -> Iterator[tuple[str, Path]]:
    with running_tinyproxy(tmp_path) as proxy:
        yield proxy


def test_requests_go_through_the_http_proxy_the_environment_names(small_model, s3_server, s3_env, tinyproxy,
                                                                   tmp_path):
    proxy, log = tinyproxy
    # Straight to SeaweedFS (not via the counting proxy), through tinyproxy; NO_PROXY must not exempt loopback.
    env = {**s3_env, "AWS_ENDPOINT_URL": s3_server.endpoint, "HTTP_PROXY": proxy, "NO_PROXY": "",
           "no_proxy": ""}
    result = weightsync("sync", "--source", small_model, "--dest", str(tmp_path / "vol"), env=env)
    assert result.returncode == 0, result.stderr
    port = s3_server.endpoint.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}" in log.read_text(), "the listing and GETs went through the proxy"
    bypass = weightsync("sync", "--source", small_model, "--dest", str(tmp_path / "vol2"),
                        env={**env, "NO_PROXY": "127.0.0.1"})
    assert bypass.returncode == 0, bypass.stderr


# ----------------------------------------------------------------------------- replies only a stub gives


class Stub:
    """An HTTP/1.1 server on loopback whose every reply comes from `answer(handler)`; records each request."""

    def __init__(self, answer: Callable[[http.server.BaseHTTPRequestHandler], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stub.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                answer(self)

            do_HEAD = do_GET

            def log_message(self, *_: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None, close: bool = False) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
    handler.wfile.flush()
    if close:  # without saying so: the client finds out on its next request
        handler.close_connection = True


LISTING = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
           b"<IsTruncated>false</IsTruncated><Contents><Key>m/w.bin</Key><Size>10</Size>"
           b"<ETag>&quot;0123456789abcdef0123456789abcdef&quot;</ETag></Contents></ListBucketResult>")


@pytest.fixture
def stub_env(monkeypatch, tmp_path) -> Callable[[Stub], S3Source]:
    def for_stub(stub: Stub) -> S3Source:
        settings_from(monkeypatch, tmp_path, AWS_ENDPOINT_URL=stub.endpoint, AWS_ACCESS_KEY_ID="k",
                      AWS_SECRET_ACCESS_KEY="s", AWS_REGION="us-east-1")
        return S3Source.from_uri("s3://bkt/m", addressing_style="path")
    return for_stub


def test_a_bucket_in_another_region_is_followed_once_and_signed_for_it(stub_env):
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if "/eu-west-1/" in handler.headers["Authorization"]:
            reply(handler, 200, LISTING)
        else:  # what AWS says to a request signed for the wrong region
            reply(handler, 301, b"<Error><Code>PermanentRedirect</Code></Error>", {"x-amz-bucket-region": "eu-west-1"})

    stub = Stub(answer)
    try:
        files = stub_env(stub).snapshot(None, Selection()).files
    finally:
        stub.close()
    assert [f.path for f in files] == ["w.bin"]
    assert len(stub.requests) == 2


def test_a_keep_alive_connection_the_server_closed_is_retried_on_a_fresh_one(stub_env):
    stub = Stub(lambda handler: reply(handler, 200, LISTING, close=True))
    try:
        source = stub_env(stub)
        for _ in range(3):  # each listing after the first finds its pooled connection closed by the server
            assert [f.path for f in source.snapshot(None, Selection()).files] == ["w.bin"]
    finally:
        stub.close()
    assert len(stub.requests) == 3


def test_a_server_that_ignores_range_is_an_error_not_wrong_bytes(stub_env):
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        if "list-type" in handler.path:
            reply(handler, 200, LISTING)
        else:
            reply(handler, 200, b"0123456789")  # the whole object, whatever Range asked

    stub = Stub(answer)
    try:
        source = stub_env(stub)
        [file] = source.snapshot(None, Selection()).files
        reader = source.open_range(file, 0, 10)  # all of it: a 200 is the right answer
        buffer = memoryview(bytearray(16))
        assert bytes(buffer[:reader.readinto(buffer)]) == b"0123456789"
        reader.close()
        with pytest.raises(SourceError, match="RangeIgnored: asked for bytes 4-9"):
            source.open_range(file, 4, 10)
    finally:
        stub.close()


def test_a_reply_that_is_not_xml_is_a_source_error_naming_it(stub_env):
    stub = Stub(lambda handler: reply(handler, 200, b"<html>captive portal</htm", {"Content-Type": "text/html"}))
    try:
        with pytest.raises(SourceError, match="MalformedReply: the reply is not S3's XML"):
            stub_env(stub).snapshot(None, Selection())
    finally:
        stub.close()


@pytest.fixture
def private_ca(tmp_path) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 (a private CA of one), and a server context that presents it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weightsync test CA")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return cert_path, context


def listing_then_bytes(handler: http.server.BaseHTTPRequestHandler) -> None:
    if "list-type" in handler.path:
        reply(handler, 200, LISTING)
    else:
        reply(handler, 206, b"0123456789", {"Content-Range": "bytes 0-9/10"})


def test_https_with_a_private_ca_needs_aws_ca_bundle_and_works_with_it(private_ca, monkeypatch, tmp_path):
    ca, context = private_ca
    stub = Stub(listing_then_bytes, tls=context)
    try:
        settings_from(monkeypatch, tmp_path, AWS_ENDPOINT_URL=stub.endpoint, AWS_ACCESS_KEY_ID="k",
                      AWS_SECRET_ACCESS_KEY="s", AWS_REGION="us-east-1")
        with pytest.raises(SourceError, match=r"TLS certificate is not trusted .*set AWS_CA_BUNDLE"):
            S3Source.from_uri("s3://bkt/m", addressing_style="path").snapshot(None, Selection())
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
        source = S3Source.from_uri("s3://bkt/m", addressing_style="path")
        [file] = source.snapshot(None, Selection()).files
        reader = source.open_range(file, 0, 10)
        buffer = memoryview(bytearray(16))
        assert bytes(buffer[:reader.readinto(buffer)]) == b"0123456789"
        reader.close()
    finally:
        stub.close()


def test_https_goes_through_the_proxy_as_a_connect_tunnel(private_ca, tinyproxy, monkeypatch, tmp_path):
    ca, context = private_ca
    proxy, log = tinyproxy
    stub = Stub(listing_then_bytes, tls=context)
    try:
        settings_from(monkeypatch, tmp_path, AWS_ENDPOINT_URL=stub.endpoint, AWS_ACCESS_KEY_ID="k",
                      AWS_SECRET_ACCESS_KEY="s", AWS_REGION="us-east-1", AWS_CA_BUNDLE=str(ca), HTTPS_PROXY=proxy,
                      NO_PROXY="", no_proxy="")
        [file] = S3Source.from_uri("s3://bkt/m", addressing_style="path").snapshot(None, Selection()).files
    finally:
        stub.close()
    assert file.path == "w.bin"
    assert "CONNECT" in log.read_text() and stub.endpoint.rsplit(":", 1)[1] in log.read_text()
