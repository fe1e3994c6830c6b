"""The S3 client against real servers: SeaweedFS, moto (auth on) and small local HTTP
servers that misbehave on purpose."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import os
import socket
import ssl
import threading
import tracemalloc
import urllib.error
import urllib.request

import pytest

import flydeploy
from tests.certificates import self_signed_certificate

AWKWARD_KEYS = ["with space.txt", "ünïcødé/ключ/鍵.bin", "plus+sign", "per%cent", "dollar$sign",
                "amp&eq=tilde~", "colon:semi;comma,", "quote'and\"", "a#hash?q", "tab\there"]


@pytest.fixture
def fast_retries(monkeypatch):
    """Retry quickly: the tests check retry behaviour, not the backoff's length."""
    monkeypatch.setattr(flydeploy.S3, "retry_base_delay_s", 0.01)
    monkeypatch.setattr(flydeploy.S3, "retry_max_delay_s", 0.05)


def test_put_get_head_delete_round_trip(s3, key_prefix):
    key = key_prefix + "doc.json"
    etag = s3.put(key, b'{"a": 1}', content_type="application/json")
    assert etag.startswith('"') and etag.endswith('"')
    assert s3.get(key) == b'{"a": 1}'
    assert s3.get_json(key) == ({"a": 1}, etag)
    info = s3.head(key)
    assert info["etag"] == etag and info["size"] == 8
    assert info["content_type"] == "application/json"
    s3.delete(key)
    assert s3.head(key) is None
    with pytest.raises(flydeploy.NotFound) as caught:
        s3.get(key)
    assert caught.value.status == 404 and caught.value.key == key
    s3.delete(key)  # deleting what is gone is not an error


@pytest.mark.parametrize("key", AWKWARD_KEYS)
def test_awkward_keys_round_trip_and_list(s3, key_prefix, key):
    full = key_prefix + key
    s3.put(full, full.encode())
    assert s3.get(full) == full.encode()
    assert list(s3.list(key_prefix)) == [full]


def test_wrong_secret_is_signature_does_not_match(seaweed, key_prefix):
    wrong_secret = "not-the-secret-" + "x" * 16
    client = seaweed.client(secret_key=wrong_secret)
    with pytest.raises(flydeploy.S3Error) as caught:
        client.put(key_prefix + "k", b"data")
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.status == 403
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert wrong_secret not in repr(caught.value) and wrong_secret not in str(caught.value.args)


def test_if_none_match_star_refuses_to_overwrite(s3, key_prefix):
    key = key_prefix + "lock"
    etag = s3.put(key, b"first", if_none_match="*")
    with pytest.raises(flydeploy.PreconditionFailed) as caught:
        s3.put(key, b"second", if_none_match="*")
    assert caught.value.status == 412
    assert s3.get(key) == b"first"
    assert s3.head(key)["etag"] == etag


def test_if_match_replaces_only_the_expected_version(s3, key_prefix):
    key = key_prefix + "meta"
    first = s3.put(key, b"v1")
    second = s3.put(key, b"v2", if_match=first)
    with pytest.raises(flydeploy.PreconditionFailed):
        s3.put(key, b"v3", if_match=first)
    with pytest.raises(flydeploy.PreconditionFailed):
        s3.delete(key, if_match=first)
    assert s3.get(key) == b"v2"
    s3.delete(key, if_match=second)
    assert s3.head(key) is None


def test_empty_object(s3, key_prefix, tmp_path):
    key = key_prefix + "empty"
    s3.put(key, b"")
    assert s3.get(key) == b""
    assert s3.head(key)["size"] == 0
    assert s3.download(key, tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
    assert (tmp_path / "empty").read_bytes() == b""


def test_50_mb_object_streams_both_ways(s3, key_prefix, tmp_path):
    source = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with open(source, "wb") as f:
        for i in range(50):
            f.write(block[i:] + block[:i])
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    key = key_prefix + "big.bin"
    etag = s3.upload(key, source)
    info = s3.head(key)
    assert (info["etag"], info["size"]) == (etag, 50 << 20)
    target = tmp_path / "copy.bin"
    assert s3.download(key, target) == expected
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "copy.bin"]
    assert hashlib.sha256(s3.get(key)).hexdigest() == expected


def test_put_takes_a_path_and_refuses_other_types(s3, key_prefix, tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"from a file")
    s3.put(key_prefix + "f", str(path))
    assert s3.get(key_prefix + "f") == b"from a file"
    with pytest.raises(TypeError, match="bytes or a file path"):
        s3.put(key_prefix + "g", 42)
    with pytest.raises(flydeploy.FlyDeployError, match="missing.txt"):
        s3.upload(key_prefix + "h", tmp_path / "missing.txt")


def test_listing_spans_several_pages(s3, key_prefix):
    keys = sorted(f"{key_prefix}item-{i:03d}" for i in range(23))
    for key in keys:
        s3.put(key, b"x")
    s3.put(key_prefix.rstrip("/") + "-sibling", b"not under the prefix")
    pages = []
    real_call = s3._call

    def counting_call(*args, **kwargs):
        pages.append(kwargs.get("query"))
        return real_call(*args, **kwargs)

    s3._call = counting_call
    assert list(s3.list(key_prefix, page_size=5)) == keys
    assert len(pages) == 5 and all("continuation-token" in q for q in pages[1:])


def test_get_json_of_something_else_is_a_clear_error(s3, key_prefix):
    s3.put(key_prefix + "notjson", b"<html>")
    with pytest.raises(flydeploy.S3Error, match="not valid JSON") as caught:
        s3.get_json(key_prefix + "notjson")
    assert caught.value.code == "InvalidJSON"


def test_presigned_url_works_with_plain_urllib(s3, key_prefix):
    key = key_prefix + "shared file ü+.txt"
    s3.put(key, b"presigned content")
    with urllib.request.urlopen(s3.presigned_url(key, expires=60), timeout=10) as response:
        assert response.read() == b"presigned content"
    tampered = s3.presigned_url(key).replace("X-Amz-Expires=3600", "X-Amz-Expires=7200")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(tampered, timeout=10)
    assert caught.value.code == 403


def test_from_env_reads_the_standard_variables(seaweed, monkeypatch, key_prefix):
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    client = flydeploy.S3.from_env()
    assert (client.endpoint, client.bucket) == (seaweed.endpoint, seaweed.bucket)
    client.put(key_prefix + "env", b"ok")
    assert client.get(key_prefix + "env") == b"ok"
    assert flydeploy.S3.from_env(bucket="other").bucket == "other"


def test_from_env_names_every_missing_variable(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BUCKET_NAME",
                 "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(flydeploy.ConfigError) as caught:
        flydeploy.S3.from_env()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BUCKET_NAME"):
        assert name in str(caught.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    with pytest.raises(flydeploy.ConfigError) as caught:
        flydeploy.S3.from_env(bucket="b")
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value)
    assert "AWS_ACCESS_KEY_ID" not in str(caught.value) and "BUCKET" not in str(caught.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    client = flydeploy.S3.from_env(bucket="b")
    assert client.endpoint == "https://fly.storage.tigris.dev" and client.region == "auto"


def test_bad_endpoint_is_a_config_error():
    with pytest.raises(flydeploy.ConfigError, match="AWS_ENDPOINT_URL_S3"):
        flydeploy.S3("fly.storage.tigris.dev", "b", "AK", "SK")


# --- moto: what SeaweedFS does not check -------------------------------------

@pytest.mark.parametrize("key", ["double//slash", "dot/../dot", "./leading-dot", "trailing/.",
                                 "/leading-slash", "sp ace+%$&=~ü"])
def test_keys_are_signed_exactly_as_sent(moto, key):
    client = moto.client()
    client.put(key, key.encode())
    assert client.get(key) == key.encode()
    assert key in set(client.list(""))


def test_session_token_is_sent_and_signed(moto):
    access_key, secret_key, token = moto.session_credentials()
    client = moto.client(access_key=access_key, secret_key=secret_key, session_token=token)
    client.put("with-token", b"temporary credentials")
    assert client.get("with-token") == b"temporary credentials"
    wrong = moto.client(access_key=access_key, secret_key=secret_key, session_token=token[:-4])
    with pytest.raises(flydeploy.S3Error) as caught:
        wrong.get("with-token")
    assert caught.value.code == "InvalidToken"
    assert token[:-4] not in str(caught.value) and secret_key not in str(caught.value)


def test_wrong_secret_on_moto_too(moto):
    with pytest.raises(flydeploy.S3Error) as caught:
        moto.client(secret_key="wrong").put("k", b"v")
    assert caught.value.code == "SignatureDoesNotMatch"


# --- misbehaving servers ----------------------------------------------------

class ScriptedServer:
    """A local HTTP server answering the n-th request with ``script[n]`` (the last entry
    repeats): a (status, body) pair or (status, body, extra headers), or "truncate" (a 200 promising more bytes than it
    sends, then the connection is cut) or "die" (like truncate, and the server stops)."""

    def __init__(self, script):
        self.script = script
        self.requests: list[tuple[str, str, dict]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.requests.append((self.command, self.path, dict(self.headers)))
                step = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                if step in ("truncate", "die"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 << 20))
                    self.end_headers()
                    self.wfile.write(b"x" * (256 << 10))
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    if step == "die":
                        outer.stop()
                    return
                status, body, *extra = step
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"e"')
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self.wfile.write(body)  # a client that gave up is no server error

            do_GET = do_PUT = do_HEAD = do_DELETE = handle_one

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.stopped = False

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.httpd.socket.close()
            threading.Thread(target=self.httpd.shutdown, daemon=True).start()


@pytest.fixture
def scripted(request):
    servers = []

    def start(script):
        server = ScriptedServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


SECRET = "sEcReT/with+chars-0123456789abcdef"
TOKEN = "session-token-ABCDEFG-0123456789"


def _client(endpoint):
    return flydeploy.S3(endpoint, "bucket", "AKIDEXAMPLE", SECRET, session_token=TOKEN)


def _error_xml(code, message):
    return (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{message}</Message><RequestId>req-1</RequestId></Error>").encode()


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_retryable_statuses_are_retried(scripted, fast_retries, status):
    server = scripted([(status, _error_xml("Busy", "try later")), (status, b""), (200, b"body")])
    assert _client(server.endpoint).get("k") == b"body"
    assert len(server.requests) == 3


def test_retries_give_up_with_the_last_error(scripted, fast_retries):
    server = scripted([(503, _error_xml("SlowDown", "Please reduce your request rate."))])
    with pytest.raises(flydeploy.S3Error) as caught:
        _client(server.endpoint).put("k", b"v")
    assert len(server.requests) == flydeploy.S3.retry_attempts
    error = caught.value
    assert (error.status, error.code, error.request_id, error.key) == (503, "SlowDown", "req-1", "k")
    assert "gave up after" in str(error)


@pytest.mark.parametrize("status,cls", [(400, flydeploy.S3Error), (403, flydeploy.S3Error),
                                        (404, flydeploy.NotFound),
                                        (412, flydeploy.PreconditionFailed)])
def test_other_client_errors_are_never_retried(scripted, fast_retries, status, cls):
    server = scripted([(status, _error_xml("Nope", "no")), (200, b"body")])
    with pytest.raises(cls) as caught:
        _client(server.endpoint).get("k")
    assert type(caught.value) is cls and caught.value.status == status
    assert len(server.requests) == 1


def test_every_request_is_consistent_and_signed(scripted):
    server = scripted([(200, b"")])
    _client(server.endpoint).put("a key", b"v", content_type="text/plain", if_none_match="*")
    method, path, headers = server.requests[0]
    assert (method, path) == ("PUT", "/bucket/a%20key")
    assert headers["x-tigris-consistent"] == "true"
    assert headers["X-Amz-Security-Token"] == TOKEN
    signed = headers["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"host", "if-none-match", "content-type", "x-tigris-consistent",
            "x-amz-security-token", "x-amz-date", "x-amz-content-sha256"} <= set(signed)


@pytest.mark.parametrize("failure", ["truncate", "die"])
def test_server_dying_mid_download_leaves_no_partial_file(scripted, fast_retries, tmp_path,
                                                          failure):
    server = scripted([failure])
    target = tmp_path / "release.tar.gz"
    target.write_bytes(b"previous content")
    client = _client(server.endpoint)
    with pytest.raises(flydeploy.S3Error) as caught:
        client.download("releases/app.tar.gz", target)
    assert "gave up after" in str(caught.value)
    if failure == "truncate":
        assert f"of {10 << 20} bytes" in str(caught.value)
        assert len(server.requests) == flydeploy.S3.retry_attempts
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["release.tar.gz"]
    with pytest.raises(flydeploy.S3Error):
        client.get("releases/app.tar.gz")


def test_secrets_never_appear_in_errors_or_logs(scripted, fast_retries, caplog):
    server = scripted([(503, _error_xml("SlowDown", "busy")), (403, _error_xml("AccessDenied",
                                                                              "denied"))])
    client = _client(server.endpoint)
    caught = []
    with caplog.at_level(logging.DEBUG, logger="flydeploy"):
        for call in (lambda: client.get("k"), lambda: _client("http://127.0.0.1:9").get("k")):
            with pytest.raises(flydeploy.S3Error) as info:
                call()
            caught.append(info.value)
    texts = [str(e) for e in caught] + [repr(e) for e in caught] + [repr(client)]
    texts += [str(e.__dict__) for e in caught] + [r.getMessage() for r in caplog.records]
    assert len(caplog.records) >= 2
    for text in texts:
        assert SECRET not in text and TOKEN not in text


def test_timeouts_are_retried_then_reported(fast_retries):
    # A listening socket that never answers: connections queue in the backlog.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        client = flydeploy.S3(f"http://127.0.0.1:{port}", "bucket", "AK", SECRET, timeout=0.2)
        with pytest.raises(flydeploy.S3Error) as caught:
            client.get("k")
    assert caught.value.code == "ConnectionError"
    assert "timed out" in str(caught.value) and "gave up after" in str(caught.value)


def test_tls_certificates_are_always_verified(scripted, fast_retries, tmp_path, monkeypatch):
    server = scripted([(200, b"over tls")])
    cert_path, key_path = self_signed_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
    endpoint = server.endpoint.replace("http://", "https://")
    with pytest.raises(flydeploy.S3Error, match="certificate") as caught:
        _client(endpoint).get("k")
    assert "gave up" not in str(caught.value)  # a bad certificate is never retried
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))  # now the system trusts it
    assert _client(endpoint).get("k") == b"over tls"


# --- review fixes ---------------------------------------------------------------

def test_error_message_is_the_servers_own(scripted, fast_retries):
    server = scripted([(400, _error_xml("InvalidArgument", "the server's own words")),
                       (403, b"")])
    client = _client(server.endpoint)
    with pytest.raises(flydeploy.S3Error) as caught:
        client.get("k")
    error = caught.value
    assert error.message == "the server's own words" and error.code == "InvalidArgument"
    assert str(error).startswith("GET s3://bucket/k failed: HTTP 400 InvalidArgument: "
                                 "the server's own words (request id req-1)")
    # A HEAD reply has no body: no server message, but the same hint as other 403s.
    with pytest.raises(flydeploy.S3Error) as caught:
        client.head("k")
    assert caught.value.message == "" and caught.value.status == 403
    assert "AWS_SECRET_ACCESS_KEY" in str(caught.value) and "clock" in str(caught.value)


def test_given_up_errors_keep_the_servers_message(scripted, fast_retries):
    server = scripted([(503, _error_xml("SlowDown", "Please reduce your request rate."))])
    with pytest.raises(flydeploy.S3Error) as caught:
        _client(server.endpoint).get("k")
    assert caught.value.message == "Please reduce your request rate."
    assert str(caught.value).endswith(f"(gave up after {flydeploy.S3.retry_attempts} attempts)")


@pytest.mark.parametrize("status,header,waits", [(503, "1", [1.0]), (429, "2", [2.0]),
                                                 (500, "3", None)])
def test_retry_after_is_honoured_on_429_and_503(scripted, fast_retries, monkeypatch,
                                                status, header, waits):
    waited = []
    monkeypatch.setattr(flydeploy.time, "sleep", waited.append)
    server = scripted([(status, b"", {"Retry-After": header}), (200, b"body")])
    assert _client(server.endpoint).get("k") == b"body"
    if waits is None:  # not a status that asks clients to wait: the usual backoff
        assert len(waited) == 1 and waited[0] <= flydeploy.S3.retry_max_delay_s
    else:
        assert waited == waits


def test_a_retry_after_beyond_a_minute_is_not_waited_out(scripted, fast_retries, monkeypatch):
    waited = []
    monkeypatch.setattr(flydeploy.time, "sleep", waited.append)
    server = scripted([(503, b"", {"Retry-After": "3600"})])
    with pytest.raises(flydeploy.S3Error, match="retry after 3600s"):
        _client(server.endpoint).get("k")
    assert waited == [] and len(server.requests) == 1


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, ValueError])
def test_any_failure_mid_request_drops_the_connection(scripted, fast_retries, monkeypatch,
                                                      tmp_path, caplog, interruption):
    server = scripted([(200, b"body")])
    client = _client(server.endpoint)
    assert client.get("warm") == b"body"  # a persistent connection now exists
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * (3 << 20))

    def send_part_then_fail(self, conn):
        conn.send(b"x" * 1000)
        raise interruption("interrupted")

    monkeypatch.setattr(flydeploy._FileBody, "send", send_part_then_fail)
    with pytest.raises(interruption):
        client.put("k", source)
    with caplog.at_level(logging.WARNING, logger="flydeploy"):
        assert client.get("next") == b"body"
    assert caplog.records == [], "the next request must not meet the half-sent one"
    assert [path for _, path, _ in server.requests][-1] == "/bucket/next"


@pytest.mark.parametrize("field", ["access_key", "secret_key", "session_token"])
@pytest.mark.parametrize("bad", ["\r\nX-Injected: 1", "\n", "\x01", " "])
def test_credentials_with_control_characters_are_refused(field, bad):
    variable = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
                "session_token": "AWS_SESSION_TOKEN"}[field]
    secret = "Secret0123456789" + bad + "tail"
    values = {"access_key": "AKID", "secret_key": "SK", "session_token": None, field: secret}
    with pytest.raises(flydeploy.ConfigError, match=variable) as caught:
        flydeploy.S3("http://127.0.0.1:9", "bucket", values["access_key"], values["secret_key"],
                     session_token=values["session_token"])
    assert "Secret0123456789" not in str(caught.value) and "tail" not in str(caught.value)


def test_a_malformed_region_is_refused():
    with pytest.raises(flydeploy.ConfigError, match="AWS_REGION"):
        flydeploy.S3("http://127.0.0.1:9", "bucket", "AK", SECRET, region="auto\r\nX: 1")


def test_endpoint_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(flydeploy.ConfigError, match="AWS_ENDPOINT_URL_S3") as caught:
        flydeploy.S3("https://user:hunter2pass@fly.storage.tigris.dev", "bucket", "AK", SECRET)
    assert "hunter2pass" not in str(caught.value)
    client = _client("https://fly.storage.tigris.dev")
    assert SECRET not in repr(client) and "AKIDEXAMPLE" not in repr(client)
    assert TOKEN not in repr(client)


def test_keys_with_control_characters_list_back_exactly(s3, key_prefix):
    keys = sorted([key_prefix + k for k in ["a\rb", "a\x01b", "a\nb", "a+b c", "a%2Bb"]])
    for key in keys:
        s3.put(key, key.encode())
    assert list(s3.list(key_prefix)) == keys
    assert [s3.get(key) for key in keys] == [key.encode() for key in keys]


def test_a_str_is_a_path_and_text_must_be_encoded(scripted, tmp_path):
    server = scripted([(200, b"")])
    with pytest.raises(flydeploy.FlyDeployError, match=r"text\.encode\(\)") as caught:
        _client(server.endpoint).put("k", "hello, world")
    assert "takes bytes or the path of a file" in str(caught.value)
    assert server.requests == []


@pytest.mark.parametrize("key,why", [("", "non-empty"), ("caf\udce9", "not valid UTF-8"),
                                     ("k" * 1025, "longer than 1024 bytes")])
def test_invalid_keys_are_project_errors(scripted, key, why):
    server = scripted([(200, b"")])
    client = _client(server.endpoint)
    for call in (lambda: client.get(key), lambda: client.put(key, b"v"),
                 lambda: client.delete(key), lambda: client.url(key)):
        with pytest.raises(flydeploy.S3Error, match=why) as caught:
            call()
        assert caught.value.code == "InvalidKey"
    assert server.requests == []


def test_download_into_a_missing_folder_is_a_clear_error(scripted, tmp_path):
    server = scripted([(200, b"body")])
    with pytest.raises(flydeploy.FlyDeployError, match="does not exist") as caught:
        _client(server.endpoint).download("k", tmp_path / "missing" / "out.bin")
    assert str(tmp_path / "missing") in str(caught.value)
    assert not (tmp_path / "missing").exists()


def test_upload_and_download_stream_in_bounded_memory(s3, key_prefix, tmp_path):
    size = 50 << 20
    source = tmp_path / "big.bin"
    with open(source, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        s3.upload(key_prefix + "big", source)
        upload_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        digest = s3.download(key_prefix + "big", tmp_path / "back.bin")
        download_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(source.read_bytes()).hexdigest()
    # A few 1 MiB buffers at most, never the object.
    assert upload_peak < 8 << 20, upload_peak
    assert download_peak < 8 << 20, download_peak
