"""Pack a generated 10,000-file source tree with pack_release and with `tar -czf`.

Prints one JSON line: the median wall time of each over a few runs in this
same process (machines are noisy, so the baseline is measured alongside) and
their ratio.  Goal: pack_release takes at most 1.5x tar's wall time.
"""

import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import flydeploy  # noqa: E402

FILES = 10_000
PACKAGES = 200
RUNS = 5
GOAL_RATIO = 1.5


def make_tree(root: pathlib.Path) -> int:
    """Write FILES source-like files (PACKAGES packages of modules); return their total size."""
    rng = random.Random(42)
    words = ["def", "return", "self", "state", "value", "import", "class", "for", "in",
             "if", "else", "None", "True", "counter", "handle_call", "reply", "=", "+", "(", ")"]
    total = 0
    for p in range(PACKAGES):
        package = root / "app" / f"pkg{p // 10:02d}" / f"sub{p % 10}"
        package.mkdir(parents=True)
        # Packages all the way down, as pack_release's default choice expects.
        for level in (package.parent.parent, package.parent, package):
            (level / "__init__.py").write_text("")
        for m in range(FILES // PACKAGES - 1):
            lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                     for _ in range(rng.randint(10, 120))]
            text = "\n".join(lines) + "\n"
            (package / f"mod{m}.py").write_text(text)
            total += len(text)
    return total


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = pathlib.Path(tmp)
        tree = tmp_path / "tree"
        size = make_tree(tree)
        files = sum(len(names) for _, _, names in os.walk(tree))
        out = tmp_path / "release.tar.gz"
        baseline = tmp_path / "baseline.tar.gz"

        def pack() -> None:
            flydeploy.pack_release(tree, out, app="bench", version="v1")

        def tar() -> None:
            subprocess.run(["tar", "-czf", str(baseline), "-C", str(tree), "."], check=True)

        pack(), tar()  # warm the page cache for both
        pack_times, tar_times = [], []
        for _ in range(RUNS):  # interleaved, so that noise hits both alike
            pack_times.append(timed(pack))
            tar_times.append(timed(tar))
        pack_s, tar_s = statistics.median(pack_times), statistics.median(tar_times)
        print(json.dumps({
            "benchmark": "pack_release vs tar -czf",
            "files": files,
            "source_bytes": size,
            "pack_s": round(pack_s, 4),
            "tar_s": round(tar_s, 4),
            "ratio": round(pack_s / tar_s, 3),
            "goal_ratio_at_most": GOAL_RATIO,
            "goal_met": pack_s / tar_s <= GOAL_RATIO,
            "pack_bytes": out.stat().st_size,
            "tar_bytes": baseline.stat().st_size,
        }))


if __name__ == "__main__":
    main()
