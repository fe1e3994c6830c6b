"""Upload and download of a 200 MB file through SeaweedFS: throughput and peak RSS growth.

Prints one JSON line.  flydeploy's ``S3.upload`` / ``S3.download`` against
botocore's ``put_object`` / ``get_object`` (body streamed in 1 MiB chunks) on the
same file and server in the same run.  Peak RSS growth is the rise of this
process's high-water mark (VmHWM, reset through /proc/self/clear_refs before each
transfer) over its resident size when the transfer starts.  Goal: flydeploy's
peak RSS growth under 32 MB in both directions.
"""

import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time

import botocore.config
import botocore.session

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import run_seaweed  # noqa: E402

SIZE_MB = 200
MB = 1 << 20


def _status_kb(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure(action) -> tuple[float, float]:
    """(seconds, peak RSS growth in MB) of ``action()``."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    return elapsed, (_status_kb("VmHWM") - baseline_kb) / 1024


def write_source(path: pathlib.Path) -> str:
    block = os.urandom(MB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(SIZE_MB):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "seaweed").mkdir()
        source = tmp / "source.bin"
        expected = write_source(source)
        with run_seaweed(tmp / "seaweed") as server:
            s3 = server.client()
            # The first write makes SeaweedFS allocate its volumes; keep that out of the timings.
            s3.put("bench/warm-up.bin", os.urandom(8 * MB))
            results = {}

            up_s, up_rss = measure(lambda: s3.upload("bench/flydeploy.bin", source))
            digest = []
            down_s, down_rss = measure(
                lambda: digest.append(s3.download("bench/flydeploy.bin", tmp / "ours.bin")))
            if digest != [expected]:
                raise SystemExit("flydeploy download does not match the source")
            (tmp / "ours.bin").unlink()
            results.update(upload_mb_s=SIZE_MB / up_s, download_mb_s=SIZE_MB / down_s,
                           upload_rss_growth_mb=up_rss, download_rss_growth_mb=down_rss)

            client = botocore.session.get_session().create_client(
                "s3", endpoint_url=server.endpoint, region_name="us-east-1",
                aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
                config=botocore.config.Config(s3={"addressing_style": "path"}))

            def boto_upload():
                with open(source, "rb") as f:
                    client.put_object(Bucket=server.bucket, Key="bench/botocore.bin", Body=f)

            def boto_download():
                body = client.get_object(Bucket=server.bucket, Key="bench/botocore.bin")["Body"]
                with open(tmp / "boto.bin", "wb") as out:
                    for chunk in body.iter_chunks(MB):
                        out.write(chunk)

            b_up_s, b_up_rss = measure(boto_upload)
            b_down_s, b_down_rss = measure(boto_download)
            results.update(botocore_upload_mb_s=SIZE_MB / b_up_s,
                           botocore_download_mb_s=SIZE_MB / b_down_s,
                           botocore_upload_rss_growth_mb=b_up_rss,
                           botocore_download_rss_growth_mb=b_down_rss)
    line = {"benchmark": "transfer", "size_mb": SIZE_MB}
    line.update({name: round(value, 1) for name, value in results.items()})
    line.update(goal_rss_growth_mb=32,
                goal_met=max(results["upload_rss_growth_mb"],
                             results["download_rss_growth_mb"]) < 32)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
