"""SigV4 signer: the published test vectors that apply to S3, and botocore's S3 signer.

The vectors live in ``tests/data/sigv4`` (``SOURCE.txt`` there says where each set comes
from, with its licence); ``S3-NOTES.txt`` says which cases follow S3's rules and why the
others (path normalisation, a token added after signing) do not apply.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import pathlib
import urllib.parse

import botocore.auth
import pytest
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import flydeploy

VECTORS = pathlib.Path(__file__).resolve().parent / "data" / "sigv4"

SUITE_TIME = datetime.datetime(2015, 8, 30, 12, 36, tzinfo=datetime.timezone.utc)
SUITE_AMZ_DATE = "20150830T123600Z"
SUITE_ACCESS_KEY = "AKIDEXAMPLE"
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_TOKEN = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"

# S3-NOTES.txt, "aws4_testsuite/ ... use:"
AWS4_CASES = [
    "get-vanilla", "get-vanilla-query", "get-vanilla-empty-query-key",
    "get-vanilla-query-order-key", "get-vanilla-query-order-value",
    "get-vanilla-query-order-key-case", "get-vanilla-query-order-encoded",
    "get-vanilla-query-unreserved", "get-vanilla-utf8-query", "get-unreserved", "get-utf8",
    "get-header-key-duplicate", "get-header-value-order", "get-header-value-trim",
    "get-header-value-multiline", "post-header-key-case", "post-header-key-sort",
    "post-header-value-case", "post-vanilla", "post-vanilla-query",
    "post-vanilla-empty-query-value", "post-x-www-form-urlencoded",
    "post-x-www-form-urlencoded-parameters", "normalize-path/get-space",
    "normalize-path/get-special-character", "get-vanilla-with-session-token",
    "post-sts-token/post-sts-header-before",
]

# S3-NOTES.txt, "aws-signing-test-suite/v4/ ... use": every case except the
# normalised-path ones and the token added after signing.
CRT_EXCLUDED = {
    "get-relative-normalized", "get-relative-relative-normalized", "get-slash-normalized",
    "get-slash-dot-slash-normalized", "get-slash-pointless-dot-normalized",
    "get-slashes-normalized", "post-sts-header-after",
}


def _crt_cases() -> list[str]:
    folder = VECTORS / "aws-signing-test-suite" / "v4"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in CRT_EXCLUDED)


def _parse_http_request(text: str) -> tuple[str, str, str, list[tuple[str, str]], bytes]:
    """(method, path, query, header pairs, body) of a raw test-suite request; folded
    header lines continue the previous value."""
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.rsplit(" ", 1)[0]
    path, _, query = target.partition("?")
    headers: list[list[str]] = []
    for line in filter(None, lines[1:]):
        if line[:1] in (" ", "\t"):
            headers[-1][1] += "\n" + line
        else:
            name, _, value = line.partition(":")
            headers.append([name, value])
    return method, path, query, [(n, v) for n, v in headers], body.encode()


@pytest.mark.parametrize("case", AWS4_CASES)
def test_aws4_testsuite_vector(case):
    folder = VECTORS / "aws4_testsuite" / case
    name = folder.name
    expected = {ext: (folder / f"{name}.{ext}").read_text() for ext in ("creq", "sts", "authz")}
    method, path, query, headers, body = _parse_http_request((folder / f"{name}.req").read_text())
    if case == "get-vanilla-with-session-token":
        headers.append(("X-Amz-Security-Token", SUITE_TOKEN))
    signed = flydeploy._sign(method, path, query, headers,
                             payload_hash=hashlib.sha256(body).hexdigest(), secret_key=SUITE_SECRET,
                             region="us-east-1", service="service", amz_date=SUITE_AMZ_DATE)
    assert signed.canonical_request == expected["creq"]
    assert signed.string_to_sign == expected["sts"]
    authorization = (f"AWS4-HMAC-SHA256 Credential={SUITE_ACCESS_KEY}/{signed.scope}, "
                     f"SignedHeaders={signed.signed_headers}, Signature={signed.signature}")
    assert authorization == expected["authz"]


@pytest.mark.parametrize("case", _crt_cases())
def test_crt_header_vector(case):
    folder = VECTORS / "aws-signing-test-suite" / "v4" / case
    context = json.loads((folder / "context.json").read_text())
    method, path, query, headers, body = _parse_http_request((folder / "request.txt").read_text())
    token = context["credentials"].get("token")
    payload_hash = hashlib.sha256(body).hexdigest()
    expected_signature = (folder / "header-signature.txt").read_text().strip()
    if context["sign_body"]:
        # The public signer always signs x-amz-content-sha256, as these cases do.
        added = flydeploy.sign_request(
            method, f"https://example.amazonaws.com{path}" + (f"?{query}" if query else ""),
            headers, payload_hash=payload_hash, access_key=SUITE_ACCESS_KEY,
            secret_key=SUITE_SECRET, region=context["region"], service=context["service"],
            session_token=token, now=SUITE_TIME)
        assert added["Authorization"].endswith(f"Signature={expected_signature}")
        assert added["X-Amz-Content-Sha256"] == payload_hash
        headers += [("X-Amz-Content-Sha256", payload_hash)]
    headers += [("X-Amz-Date", SUITE_AMZ_DATE)]
    if token:
        headers.append(("X-Amz-Security-Token", token))
    signed = flydeploy._sign(method, path, query, headers, payload_hash=payload_hash,
                             secret_key=SUITE_SECRET, region=context["region"],
                             service=context["service"], amz_date=SUITE_AMZ_DATE)
    assert signed.canonical_request == (folder / "header-canonical-request.txt").read_text()
    assert signed.string_to_sign == (folder / "header-string-to-sign.txt").read_text()
    assert signed.signature == expected_signature


@pytest.mark.parametrize("case", _crt_cases())
def test_crt_query_vector(case):
    """The presigned form: these vectors hash the empty body where S3 puts UNSIGNED-PAYLOAD,
    so the mechanics are checked with that payload hash."""
    folder = VECTORS / "aws-signing-test-suite" / "v4" / case
    context = json.loads((folder / "context.json").read_text())
    if context["sign_body"]:
        pytest.skip("the presigned form never signs a body hash header")
    method, path, query, headers, body = _parse_http_request((folder / "request.txt").read_text())
    if len(headers) != 1:
        pytest.skip("presign_url signs only host; this case signs further headers")
    url = f"https://example.amazonaws.com{urllib.parse.quote(path)}" + (f"?{query}" if query else "")
    presigned = flydeploy._presign(
        method, url, payload_hash=hashlib.sha256(body).hexdigest(),
        access_key=SUITE_ACCESS_KEY, secret_key=SUITE_SECRET, region=context["region"],
        service=context["service"], expires=context["expiration_in_seconds"],
        session_token=context["credentials"].get("token"), now=SUITE_TIME)
    expected_signature = (folder / "query-signature.txt").read_text().strip()
    assert presigned.endswith(f"&X-Amz-Signature={expected_signature}")
    signed_query = urllib.parse.urlsplit(presigned).query
    canonical = (folder / "query-canonical-request.txt").read_text().split("\n")
    assert flydeploy._canonical_query(signed_query.rpartition("&")[0]) == canonical[2]


S3_DOC = json.loads((VECTORS / "s3-doc-examples" / "s3-doc-examples.json").read_text())


S3_DOC_TIME = datetime.datetime(2013, 5, 24, tzinfo=datetime.timezone.utc)


@pytest.mark.parametrize("example", [e for e in S3_DOC["examples"] if "authorization" in e],
                         ids=lambda e: e["name"])
def test_s3_doc_header_example(example):
    """Header-signed S3 examples; for the aws-chunked upload only the seed signature
    applies (flydeploy streams plain bodies and never signs chunks)."""
    url = (f"https://{example['host']}{example['path_on_wire']}"
           + (f"?{example['query_on_wire']}" if example.get("query_on_wire") else ""))
    added = flydeploy.sign_request(
        example["method"], url, example["headers_before_signing"],
        payload_hash=example["x-amz-content-sha256"],
        access_key=S3_DOC["credentials"]["access_key_id"],
        secret_key=S3_DOC["credentials"]["secret_access_key"], region=S3_DOC["region"],
        now=S3_DOC_TIME)
    assert added["Authorization"] == example["authorization"]
    assert added["X-Amz-Date"] == S3_DOC["x-amz-date"]


def test_s3_doc_presigned_example():
    example = next(e for e in S3_DOC["examples"] if e["name"] == "presigned-get-object")
    url = flydeploy.presign_url(
        example["method"], f"https://{example['host']}{example['path_on_wire']}",
        access_key=S3_DOC["credentials"]["access_key_id"],
        secret_key=S3_DOC["credentials"]["secret_access_key"], region=S3_DOC["region"],
        expires=example["expires"], now=S3_DOC_TIME)
    assert url == example["url"]


def test_host_port_is_signed_unless_default():
    base = dict(payload_hash=flydeploy._EMPTY_SHA256, access_key="AK", secret_key="SK",
                now=SUITE_TIME)
    explicit_default = flydeploy.sign_request("GET", "https://h.example:443/k", {}, **base)
    implicit_default = flydeploy.sign_request("GET", "https://h.example/k", {}, **base)
    other_port = flydeploy.sign_request("GET", "https://h.example:8443/k", {}, **base)
    with_host = flydeploy.sign_request("GET", "https://h.example/k", {"Host": "h.example:8443"},
                                       **base)
    assert explicit_default == implicit_default
    assert other_port != implicit_default
    assert other_port == with_host


def test_session_token_is_signed_and_returned():
    added = flydeploy.sign_request("GET", "http://127.0.0.1:9000/b/k", {},
                                   payload_hash=flydeploy._EMPTY_SHA256, access_key="AK",
                                   secret_key="SK", session_token="TOKEN", now=SUITE_TIME)
    assert added["X-Amz-Security-Token"] == "TOKEN"
    assert "x-amz-security-token" in added["Authorization"]


def test_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="aware datetime"):
        flydeploy.sign_request("GET", "http://h/b/k", {}, payload_hash="UNSIGNED-PAYLOAD",
                               access_key="AK", secret_key="SK",
                               now=datetime.datetime(2020, 1, 1))


def test_derived_signing_keys_are_cached_per_secret_date_region_and_service(monkeypatch):
    derivations = []
    real_digest = flydeploy.hmac.digest

    def counting_digest(key, message, digest):
        if isinstance(key, bytes) and key.startswith(b"AWS4"):
            derivations.append(key)  # the first step of deriving a signing key
        return real_digest(key, message, digest)

    monkeypatch.setattr(flydeploy.hmac, "digest", counting_digest)
    flydeploy._signing_key.cache_clear()
    day = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.timezone.utc)

    def sign(secret="SK", now=day, region="auto", service="s3"):
        return flydeploy.sign_request("GET", "https://h/b/k", {}, payload_hash=flydeploy._EMPTY_SHA256,
                                      access_key="AK", secret_key=secret, region=region,
                                      service=service, now=now)["Authorization"]

    first = sign()
    later_that_day = sign(now=day + datetime.timedelta(hours=5))
    assert len(derivations) == 1, "same secret, date, region and service: derived once"
    assert first != later_that_day  # the signatures differ, the key does not
    sign(secret="other")
    sign(now=day + datetime.timedelta(days=1))
    sign(region="us-east-1")
    sign(service="sts")
    assert len(derivations) == 5, "each of secret, date, region, service keys the cache"
    sign(secret="other")
    sign(region="us-east-1")
    assert len(derivations) == 5


def test_presign_refuses_out_of_range_expiry():
    for expires in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="out of range"):
            flydeploy.presign_url("GET", "http://h/b/k", access_key="AK", secret_key="SK",
                                  expires=expires)


# --- property test against botocore's S3 signer -------------------------------

AWKWARD = st.sampled_from(list(" +%$&=~/ü鍵é!*'()@:,;?#[]"))
KEY_TEXT = st.text(st.one_of(st.characters(blacklist_categories=("Cs", "Cc")), AWKWARD),
                   min_size=1, max_size=40)
QUERY_TEXT = st.text(st.one_of(st.characters(blacklist_categories=("Cs",)), AWKWARD), max_size=12)
HEADER_NAME = st.from_regex(r"x-amz-meta-[a-z0-9-]{1,12}", fullmatch=True)
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
HOSTS = st.sampled_from(["http://127.0.0.1:8333", "http://s3.example.com", "http://[::1]:9000",
                         "http://Fly.Storage.Tigris.Dev:80"])


@given(method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "HEAD"]), host=HOSTS,
       key=KEY_TEXT, query=st.lists(st.tuples(QUERY_TEXT, QUERY_TEXT), max_size=4),
       headers=st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=4),
       body=st.binary(max_size=64), region=st.sampled_from(["auto", "us-east-1", "eu-west-3"]),
       token=st.one_of(st.none(), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                          min_size=1, max_size=40)))
@settings(max_examples=300, deadline=None)
def test_signature_matches_botocore_s3_signer(method, host, key, query, headers, body, region,
                                              token):
    # Keys and query parameters go on the wire strictly percent-encoded, as the S3
    # client sends them (botocore signs the wire path and query as they are).
    url = f"{host}/bucket/{urllib.parse.quote(key, safe='/')}"
    if query:
        url += "?" + "&".join(f"{urllib.parse.quote(n, safe='')}={urllib.parse.quote(v, safe='')}"
                              for n, v in query)
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    botocore.auth.S3SigV4Auth(credentials, "s3", region).add_auth(request)
    amz_date = request.headers["X-Amz-Date"]
    now = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    ours = flydeploy.sign_request(method, url, headers,
                                  payload_hash=hashlib.sha256(body).hexdigest(),
                                  access_key="AKIDEXAMPLE",
                                  secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                  region=region, session_token=token, now=now)
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Content-Sha256"] == request.headers["X-Amz-Content-SHA256"]

    # The presigned form on the same inputs.  botocore's query signer keeps the first
    # value of a repeated name and signs only host for a request without headers.
    first_values: dict[str, str] = {}
    for name, value in query:
        first_values.setdefault(name, value)
    url = f"{host}/bucket/{urllib.parse.quote(key, safe='/')}"
    if first_values:
        url += "?" + "&".join(f"{urllib.parse.quote(n, safe='')}={urllib.parse.quote(v, safe='')}"
                              for n, v in first_values.items())
    request = AWSRequest(method=method, url=url)
    botocore.auth.S3SigV4QueryAuth(credentials, "s3", region, expires=900).add_auth(request)
    botocore_query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.url).query,
                                                 keep_blank_values=True))
    now = datetime.datetime.strptime(botocore_query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    presigned = flydeploy.presign_url(method, url, access_key="AKIDEXAMPLE",
                                      secret_key="wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                      region=region, expires=900, session_token=token, now=now)
    ours_query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(presigned).query,
                                             keep_blank_values=True))
    assert ours_query["X-Amz-Signature"] == botocore_query["X-Amz-Signature"]
    assert ours_query == botocore_query


ESCAPE_SOUP = st.lists(st.one_of(
    st.integers(0, 255).map(lambda byte: f"%{byte:02X}"),
    st.integers(0, 255).map(lambda byte: f"%{byte:02x}"),
    st.sampled_from(list("%/09afAFxyz-._~ +&=?ü"))), max_size=20).map("".join)


def _check_canonical_forms(text: str) -> None:
    """Already-canonical paths and query parts skip decoding; the result must be what
    decoding and strictly re-encoding gives."""
    decode, quote = urllib.parse.unquote_to_bytes, urllib.parse.quote
    assert flydeploy._canonical_uri("/" + text) == quote(decode("/" + text), safe="/")
    expected = []
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            expected.append(f"{quote(decode(name), safe='')}={quote(decode(value), safe='')}")
    assert flydeploy._canonical_query(text) == "&".join(sorted(
        expected, key=lambda pair: tuple(pair.split("=", 1))))


def test_canonical_fast_paths_on_every_escape():
    for byte in range(256):
        for escape in (f"%{byte:02X}", f"%{byte:02x}"):
            _check_canonical_forms(f"a{escape}b={escape}")


@given(text=ESCAPE_SOUP)
@settings(max_examples=500, deadline=None)
def test_canonical_fast_paths_agree_with_decode_and_encode(text):
    _check_canonical_forms(text)
