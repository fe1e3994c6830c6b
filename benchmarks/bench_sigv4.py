"""SigV4 signatures per second: flydeploy's signer against botocore's S3 signer.

Prints one JSON line.  Both sign the same 500 varied S3 requests (keys with
unicode and reserved characters, query strings, extra headers, half with a
session token), in alternating rounds; each figure is the median over the
rounds.  Goal: ``speedup`` (flydeploy per second / botocore per second) >= 5.
"""

import datetime
import hashlib
import json
import pathlib
import random
import statistics
import sys
import time
import urllib.parse

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import flydeploy  # noqa: E402

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "FQoGZXIvYXdzEXAMPLETOKEN" * 8
REQUESTS = 500
ROUNDS = 7
ENDPOINT = "https://fly.storage.tigris.dev"


def make_requests(rng: random.Random) -> list[dict]:
    requests = []
    for i in range(REQUESTS):
        key = f"releases/app-{i}/" + "".join(rng.choice("abcXYZ09 +%$&=~ü鍵-_.") for _ in range(24))
        url = f"{ENDPOINT}/bucket/{urllib.parse.quote(key)}"
        if i % 3 == 0:
            url += f"?list-type=2&prefix={urllib.parse.quote(key[:10], safe='')}&max-keys=1000"
        body = rng.randbytes(rng.randrange(0, 256))
        headers = {"x-tigris-consistent": "true"}
        if i % 2:
            headers["Content-Type"] = "application/json"
            headers["If-Match"] = f'"{hashlib.md5(body).hexdigest()}"'
        requests.append({"method": rng.choice(["GET", "PUT", "HEAD", "DELETE"]), "url": url,
                         "headers": headers, "payload_hash": hashlib.sha256(body).hexdigest(),
                         "body": body, "token": TOKEN if i % 2 else None})
    return requests


def time_flydeploy(requests: list[dict], now: datetime.datetime) -> float:
    sign = flydeploy.sign_request
    started = time.perf_counter()
    for r in requests:
        sign(r["method"], r["url"], r["headers"], payload_hash=r["payload_hash"],
             access_key=ACCESS_KEY, secret_key=SECRET_KEY, session_token=r["token"], now=now)
    return len(requests) / (time.perf_counter() - started)


def time_botocore(prepared: list[tuple[S3SigV4Auth, AWSRequest]]) -> float:
    started = time.perf_counter()
    for signer, request in prepared:
        signer.add_auth(request)
    return len(prepared) / (time.perf_counter() - started)


def main() -> None:
    requests = make_requests(random.Random(7))
    signers = {token: S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, token), "s3", "auto")
               for token in (None, TOKEN)}
    prepared = [(signers[r["token"]],
                 AWSRequest(method=r["method"], url=r["url"], data=r["body"],
                            headers=dict(r["headers"]))) for r in requests]
    now = datetime.datetime.now(datetime.timezone.utc)
    ours, theirs = [], []
    for _ in range(ROUNDS):
        ours.append(time_flydeploy(requests, now))
        theirs.append(time_botocore(prepared))
    ours_per_s, botocore_per_s = statistics.median(ours), statistics.median(theirs)
    print(json.dumps({"benchmark": "sigv4", "requests": REQUESTS, "rounds": ROUNDS,
                      "flydeploy_per_s": round(ours_per_s), "botocore_per_s": round(botocore_per_s),
                      "speedup": round(ours_per_s / botocore_per_s, 2), "goal_speedup": 5,
                      "goal_met": ours_per_s >= 5 * botocore_per_s}))


if __name__ == "__main__":
    main()
