"""Run every ``benchmarks/bench_*.py`` and print one JSON document of their results.

Each benchmark module defines ``run() -> dict`` and reports figures with their units in
the key names (``..._bit_per_s``, ``..._s``). `make bench` calls this; pass names
(``python benchmarks/run_all.py cascade``) to run a subset.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = set(argv)
    results: dict[str, object] = {
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
    }
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if wanted and name not in wanted:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(module)
        start = time.perf_counter()
        results[name] = module.run()
        print(f"# {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
