"""The S3 client against real servers: SeaweedFS, moto (auth on) and small local HTTP
servers that misbehave on purpose."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import socket
import threading
import urllib.error
import urllib.request

import pytest

import flydeploy

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
