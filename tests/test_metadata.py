"""current.json metadata and the deploy lock, against every store kind."""

import datetime
import hashlib
import json
import threading
import uuid

import pytest

import flydeploy
from flydeploy import (HISTORY_LIMIT, LockHeld, PreconditionFailed, ReleaseError, acquire_lock,
                       read_current, record_hot_upgrade, reset_current)

STORES = ["local", "s3"]


@pytest.fixture(params=STORES)
def store(request, tmp_path):
    """A ``LocalStore`` in a fresh folder, or the SeaweedFS-backed ``S3`` client."""
    if request.param == "local":
        return flydeploy.LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3")


@pytest.fixture
def app():
    """An app name of its own, so tests sharing one bucket never meet."""
    return "app-" + uuid.uuid4().hex[:12]


def upgrade(version: str) -> dict:
    return {"version": version, "source_image_ref": f"registry.fly.io/x:{version}",
            "tarball_url": f"https://example.invalid/releases/x-{version}.tar.gz",
            "sha256": hashlib.sha256(version.encode()).hexdigest(),
            "deployed_at": "2026-11-21T00:00:00.000Z"}


def lock_doc(store, app) -> dict:
    return json.loads(store.get(f"releases/{app}-deploy.lock"))


# --- current.json ---------------------------------------------------------------

def test_no_metadata_reads_as_none(store, app):
    assert read_current(store, app) == (None, None)


def test_record_creates_then_pushes_history(store, app):
    doc = record_hot_upgrade(store, app, upgrade("v1"), image_ref="img:1")
    assert doc["image_ref"] == "img:1" and doc["hot_upgrade"] == upgrade("v1")
    assert doc["history"] == []
    stored, etag = read_current(store, app)
    assert stored == doc and etag
    record_hot_upgrade(store, app, upgrade("v2"))
    stored, _ = read_current(store, app)
    assert stored["image_ref"] == "img:1", "the image is kept when none is given"
    assert stored["hot_upgrade"]["version"] == "v2"
    assert [h["version"] for h in stored["history"]] == ["v1"]
    raw = json.loads(store.get(f"releases/{app}-current.json"))
    assert set(raw) >= {"image_ref", "set_at", "hot_upgrade", "history"}


def test_history_keeps_the_newest_twenty(store, app):
    for n in range(1, 26):
        record_hot_upgrade(store, app, upgrade(f"v{n}"), image_ref="img:1")
    doc, _ = read_current(store, app)
    assert doc["hot_upgrade"]["version"] == "v25"
    assert len(doc["history"]) == HISTORY_LIMIT == 20
    assert [h["version"] for h in doc["history"]] == [f"v{n}" for n in range(24, 4, -1)]


def test_reset_starts_afresh_for_a_new_image(store, app):
    record_hot_upgrade(store, app, upgrade("v1"), image_ref="img:1")
    record_hot_upgrade(store, app, upgrade("v2"), image_ref="img:1")
    doc = reset_current(store, app, "img:2")
    assert doc["image_ref"] == "img:2" and doc["hot_upgrade"] is None and doc["history"] == []
    assert read_current(store, app)[0] == doc
    # A record made for yet another image does not inherit that image's history.
    record_hot_upgrade(store, app, upgrade("v3"), image_ref="img:2")
    doc = record_hot_upgrade(store, app, upgrade("v4"), image_ref="img:3")
    assert doc["image_ref"] == "img:3" and doc["history"] == []


def test_record_retries_when_a_concurrent_writer_gets_in_first(store, app):
    record_hot_upgrade(store, app, upgrade("v1"), image_ref="img:1")

    class Interleaving:
        """Lets another deployer write between our read and our conditional write."""

        def __init__(self, inner):
            self.inner, self.puts, self.refused = inner, 0, 0

        def get_json(self, key, *, if_none_match=None):
            return self.inner.get_json(key, if_none_match=if_none_match)

        def put(self, key, data, **conditions):
            self.puts += 1
            if self.puts == 1:
                record_hot_upgrade(self.inner, app, upgrade("v2-concurrent"))
            try:
                return self.inner.put(key, data, **conditions)
            except PreconditionFailed:
                self.refused += 1
                raise

    racing = Interleaving(store)
    doc = record_hot_upgrade(racing, app, upgrade("v3"))
    assert racing.refused == 1 and racing.puts == 2
    assert doc["hot_upgrade"]["version"] == "v3"
    assert [h["version"] for h in doc["history"]] == ["v2-concurrent", "v1"]
    assert read_current(store, app)[0] == doc


def test_concurrent_records_lose_nothing(store, app):
    record_hot_upgrade(store, app, upgrade("v0"), image_ref="img:1")
    barrier = threading.Barrier(6)

    def deploy(n):
        barrier.wait()
        record_hot_upgrade(store, app, upgrade(f"t{n}"))

    threads = [threading.Thread(target=deploy, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc, _ = read_current(store, app)
    versions = [doc["hot_upgrade"]["version"]] + [h["version"] for h in doc["history"]]
    assert sorted(versions) == sorted(["v0"] + [f"t{n}" for n in range(6)])
    assert versions[-1] == "v0"


def test_a_conditional_read_is_none_while_current_json_is_unchanged(store, app):
    assert read_current(store, app, if_none_match='"anything"') == (None, None), "none there yet"
    record_hot_upgrade(store, app, upgrade("v1"))
    doc, etag = read_current(store, app)
    assert read_current(store, app, if_none_match=etag) is None
    record_hot_upgrade(store, app, upgrade("v2"))
    changed, new_etag = read_current(store, app, if_none_match=etag)
    assert changed["hot_upgrade"]["version"] == "v2" and new_etag != etag


def test_malformed_metadata_and_records_are_refused(store, app):
    with pytest.raises(TypeError, match="is a dict"):
        record_hot_upgrade(store, app, ["v1"])
    with pytest.raises(ValueError, match="lacks tarball_url, sha256"):
        record_hot_upgrade(store, app, {"version": "v1"})
    with pytest.raises(ValueError, match="malformed sha256"):
        record_hot_upgrade(store, app, {**upgrade("v1"), "sha256": "abc"})
    assert read_current(store, app) == (None, None), "a refused record writes nothing"
    store.put(f"releases/{app}-current.json", b"[1, 2]")
    with pytest.raises(ReleaseError, match="not a JSON object"):
        read_current(store, app)
    with pytest.raises(ReleaseError, match="not a JSON object"):
        read_current(store, app, if_none_match='"stale"')  # as the poller reads it


class LostReply:
    """A store whose first put lands but answers 412, as when a reply is lost and the retry refused."""

    def __init__(self, inner):
        self.inner, self.lost = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, **conditions):
        etag = self.inner.put(key, data, **conditions)
        if not self.lost:
            self.lost = True
            raise PreconditionFailed("lost reply", status=412, code="PreconditionFailed", key=key)
        return etag


def test_a_record_whose_reply_was_lost_is_not_recorded_twice(store, app):
    record_hot_upgrade(store, app, upgrade("v1"), image_ref="img:1")
    flaky = LostReply(store)
    doc = record_hot_upgrade(flaky, app, upgrade("v2"))
    assert flaky.lost
    assert doc["hot_upgrade"]["version"] == "v2"
    assert [h["version"] for h in doc["history"]] == ["v1"]


# --- The deploy lock --------------------------------------------------------------

def test_held_lock_names_owner_start_and_time_left(store, app):
    lock = acquire_lock(store, app, owner="alice@laptop", deployment_id="d-1", timeout_s=600)
    with pytest.raises(LockHeld) as caught:
        acquire_lock(store, app, owner="bob@ci", deployment_id="d-2")
    held = caught.value
    assert held.owner == "alice@laptop" and held.deployment_id == "d-1"
    assert held.locked_at == lock.locked_at and 590 < held.remaining_s <= 600
    message = str(held)
    assert "alice@laptop" in message and lock.locked_at in message
    assert "expires in 9m" in message or "expires in 10m" in message
    doc = lock_doc(store, app)
    assert doc == {"locked_by": "alice@laptop", "locked_at": lock.locked_at,
                   "expires_at": lock.expires_at, "deployment_id": "d-1"}
    assert lock.release() is True
    assert store.head(f"releases/{app}-deploy.lock") is None
    with acquire_lock(store, app, owner="bob@ci", deployment_id="d-2") as second:
        assert lock_doc(store, app)["locked_by"] == "bob@ci" and second.owner == "bob@ci"
    assert store.head(f"releases/{app}-deploy.lock") is None, "leaving the block releases it"


def test_expired_lock_is_taken_over(store, app):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    store.put(f"releases/{app}-deploy.lock", json.dumps({
        "locked_by": "crashed", "locked_at": (past - datetime.timedelta(minutes=5)).isoformat(),
        "expires_at": past.isoformat(), "deployment_id": "d-old"}).encode())
    lock = acquire_lock(store, app, owner="bob", deployment_id="d-new")
    assert lock_doc(store, app)["locked_by"] == "bob"
    assert lock.release() is True


def test_unreadable_lock_is_taken_over(store, app):
    store.put(f"releases/{app}-deploy.lock", b"\x00not json")
    lock = acquire_lock(store, app, owner="bob", deployment_id="d-new")
    assert lock_doc(store, app)["deployment_id"] == "d-new"
    lock.release()


def test_force_takes_a_live_lock_and_the_old_holder_cannot_release_it(store, app):
    old = acquire_lock(store, app, owner="alice", deployment_id="d-1")
    new = acquire_lock(store, app, owner="bob", deployment_id="d-2", force=True)
    assert lock_doc(store, app)["locked_by"] == "bob"
    assert old.release() is False, "release removes the lock only if it is still ours"
    assert lock_doc(store, app)["locked_by"] == "bob"
    with pytest.raises(LockHeld, match="'bob'"):
        old.renew()
    assert new.release() is True


def test_renew_pushes_the_expiry(store, app):
    lock = acquire_lock(store, app, owner="alice", deployment_id="d-1", timeout_s=5)
    before = lock.expires_at
    lock.renew(timeout_s=3600)
    assert lock.expires_at > before and lock_doc(store, app)["expires_at"] == lock.expires_at
    with pytest.raises(LockHeld):
        acquire_lock(store, app, owner="bob", deployment_id="d-2")
    assert lock.release() is True


def race(store, app, rounds, prepare=None):
    """Two threads race for the lock ``rounds`` times; return each round's winners."""
    winners = []
    for n in range(rounds):
        if prepare:
            prepare()
        barrier = threading.Barrier(2)
        locks, errors = [], []

        def contend(who):
            barrier.wait()
            try:
                locks.append(acquire_lock(store, app, owner=who, deployment_id=f"{who}-{n}"))
            except LockHeld as err:
                errors.append(err)

        threads = [threading.Thread(target=contend, args=(who,)) for who in ("red", "blue")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(locks) + len(errors) == 2
        winners.append([lock.owner for lock in locks])
        assert lock_doc(store, app)["locked_by"] == locks[0].owner
        for lock in locks:
            assert lock.release() is True
    return winners


def test_fifty_rounds_of_two_threads_racing_for_the_lock(store, app):
    winners = race(store, app, 50)
    assert all(len(w) == 1 for w in winners), winners


def test_racing_for_an_expired_lock_has_one_winner(store, app):
    def expired_lock():
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
        store.put(f"releases/{app}-deploy.lock", json.dumps({
            "locked_by": "crashed", "locked_at": past.isoformat(), "expires_at": past.isoformat(),
            "deployment_id": "d-old"}).encode())

    winners = race(store, app, 10, prepare=expired_lock)
    assert all(len(w) == 1 for w in winners), winners


def test_a_lock_whose_reply_was_lost_is_still_ours(store, app):
    flaky = LostReply(store)
    lock = acquire_lock(flaky, app, owner="alice", deployment_id="d-1")
    assert flaky.lost and lock.owner == "alice"
    assert lock_doc(store, app)["deployment_id"] == "d-1"
    assert lock.release() is True


def test_a_takeover_whose_reply_was_lost_is_still_ours(store, app):
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    store.put(f"releases/{app}-deploy.lock", json.dumps({
        "locked_by": "crashed", "locked_at": past.isoformat(), "expires_at": past.isoformat(),
        "deployment_id": "d-old"}).encode())
    flaky = LostReply(store)
    lock = acquire_lock(flaky, app, owner="bob", deployment_id="d-2")
    assert flaky.lost and lock_doc(store, app)["deployment_id"] == "d-2"
    assert lock.release() is True


class AlwaysBeaten:
    """A store where another writer always gets in first."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, **conditions):
        raise PreconditionFailed("beaten", status=412, code="PreconditionFailed", key=key)


def test_giving_up_after_losing_every_race_says_so(store, app, monkeypatch):
    monkeypatch.setattr(flydeploy, "_backoff", lambda attempt: None)
    with pytest.raises(flydeploy.ConflictError, match="kept changing under us"):
        record_hot_upgrade(AlwaysBeaten(store), app, upgrade("v1"))
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
    store.put(f"releases/{app}-deploy.lock", json.dumps({
        "locked_by": "crashed", "locked_at": past.isoformat(), "expires_at": past.isoformat(),
        "deployment_id": "d-old"}).encode())
    with pytest.raises(flydeploy.ConflictError, match="kept changing"):
        acquire_lock(AlwaysBeaten(store), app, owner="bob", deployment_id="d-2")
    assert lock_doc(store, app)["locked_by"] == "crashed"


class LostDeleteReply:
    """A store whose first conditional delete lands but answers 412 (its reply was lost
    and the retry refused); ``meanwhile`` runs between the landing and the answer."""

    def __init__(self, inner, meanwhile=lambda: None):
        self.inner, self.meanwhile, self.lost = inner, meanwhile, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def delete(self, key, **conditions):
        self.inner.delete(key, **conditions)
        if not self.lost:
            self.lost = True
            self.meanwhile()
            raise PreconditionFailed("lost reply", status=412, code="PreconditionFailed", key=key)


def test_a_release_whose_reply_was_lost_is_not_reported_as_a_takeover(store, app, caplog):
    lock = acquire_lock(store, app, owner="alice", deployment_id="d-1")
    lock.store = LostDeleteReply(store)
    with caplog.at_level("WARNING", logger="flydeploy"):
        assert lock.release() is True
    assert lock.store.lost and store.head(f"releases/{app}-deploy.lock") is None
    # The delete landed, and another deploy took the lock before the answer came.
    lock = acquire_lock(store, app, owner="alice", deployment_id="d-1")
    later = []
    lock.store = LostDeleteReply(store, lambda: later.append(
        acquire_lock(store, app, owner="bob", deployment_id="d-2")))
    with caplog.at_level("WARNING", logger="flydeploy"):
        assert lock.release() is True
    assert lock_doc(store, app)["deployment_id"] == "d-2"
    assert not [r for r in caplog.records if "taken over" in r.getMessage()]
    later[0].release()


def test_a_forced_takeover_is_still_reported(store, app, caplog):
    old = acquire_lock(store, app, owner="alice", deployment_id="d-1")
    acquire_lock(store, app, owner="bob", deployment_id="d-2", force=True)
    with caplog.at_level("WARNING", logger="flydeploy"):
        assert old.release() is False
    assert any("taken over by 'bob'" in r.getMessage() for r in caplog.records)


class NoETags:
    """A store whose server sends no ETags (a misbehaving S3 implementation)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put(self, key, data, **conditions):
        self.inner.put(key, data, **conditions)
        return ""

    def get_json(self, key, *, if_none_match=None):
        return self.inner.get_json(key)[0], ""  # never "not modified": it has no ETags


def test_a_missing_etag_never_turns_a_conditional_write_unconditional(store, app):
    blind = NoETags(store)
    with pytest.raises(flydeploy.S3Error, match="no ETag") as caught:
        acquire_lock(blind, app, owner="alice", deployment_id="d-1")
    assert caught.value.code == "MissingETag"
    with pytest.raises(LockHeld):  # the lock it created stays (until it expires)
        acquire_lock(store, app, owner="bob", deployment_id="d-2")
    record_hot_upgrade(store, app, upgrade("v1"))
    with pytest.raises(flydeploy.S3Error, match="no ETag"):
        record_hot_upgrade(blind, app, upgrade("v2"))
    assert read_current(store, app)[0]["hot_upgrade"]["version"] == "v1"
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="If-Match"):
            store.put(f"releases/{app}-x", b"v", if_match=empty)
        with pytest.raises(ValueError, match="If-Match"):
            store.delete(f"releases/{app}-current.json", if_match=empty)
        with pytest.raises(ValueError, match="If-None-Match"):
            store.put(f"releases/{app}-x", b"v", if_none_match=empty)
    assert store.head(f"releases/{app}-x") is None
    assert read_current(store, app)[0]["hot_upgrade"]["version"] == "v1"


@pytest.mark.parametrize("timeout_s", [0, -5])
def test_a_lock_needs_a_positive_timeout(store, app, timeout_s):
    with pytest.raises(ValueError, match="positive number of seconds"):
        acquire_lock(store, app, owner="alice", deployment_id="d-1", timeout_s=timeout_s)
    assert store.head(f"releases/{app}-deploy.lock") is None
