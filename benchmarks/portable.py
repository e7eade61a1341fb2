"""Throughput of the portable llama.cpp build (GGML_NATIVE=OFF, runtime CPU dispatch) against the native one.

The installed llama-cpp-python (this venv, usually -march=native) serves one server; the
portable wheel, unpacked into its own folder and put first on PYTHONPATH, serves the other.
Same mlserve code, same model, same flags. Both servers are up at once and measured one at a
time, interleaved (native, portable, then portable, native for the next level), so the
machine's drift falls on both:

    mlserve kit build --baseline portable ...   # or: CMAKE_ARGS="..." pip wheel llama-cpp-python -w DIR
    flock /tmp/cpu.lock python benchmarks/portable.py --wheel DIR/llama_cpp_python-*.whl [--ref gemma3-270m]

Prints single-stream and concurrency-8 aggregate tokens/s for both, the ratio portable/native,
and which CPU variant the portable build picked on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_mlserve  # noqa: E402
from concurrency import http_level  # noqa: E402

from mlserve.bundles.store import Store  # noqa: E402

CTX = 1024


def unpack(wheel: Path, into: Path) -> Path:
    """The wheel's files in ``into`` (a PYTHONPATH entry), executable bits kept for the shared libraries."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into)
    for lib in (into / "llama_cpp" / "lib").glob("*.so*"):
        lib.chmod(0o755)
    return into


def build_facts(pythonpath: str | None) -> dict[str, object]:
    """What `python -m mlserve.engine.llama.hardware` reports with this llama_cpp first on the path."""
    env = {**os.environ}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run(
        [sys.executable, "-m", "mlserve.engine.llama.hardware"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", required=True, type=Path, help="the portable llama-cpp-python wheel")
    parser.add_argument("--ref", default="gemma3-270m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends per level")
    parser.add_argument("--levels", default="1,8")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    bundle = Store().resolve(args.ref)
    flags = ("--parallel", str(max(levels)), "--ctx-size", str(CTX))
    with tempfile.TemporaryDirectory(prefix="portable-llama-") as tmp:
        site = str(unpack(args.wheel, Path(tmp)))
        native_facts, portable_facts = build_facts(None), build_facts(site)
        assert portable_facts["dispatch"], "the wheel is not a GGML_BACKEND_DL build with CPU variants"
        native = start_mlserve(bundle.ref, *flags)
        os.environ["PYTHONPATH"] = site
        try:
            portable = start_mlserve(bundle.ref, *flags)
        finally:
            del os.environ["PYTHONPATH"]
        results: dict[str, dict[int, float]] = {"native": {}, "portable": {}}
        try:
            for i, c in enumerate(levels):
                order = [("native", native), ("portable", portable)]
                for name, srv in order if i % 2 == 0 else order[::-1]:
                    results[name][c] = asyncio.run(http_level(srv.url, bundle.ref, c, args.rounds, args.tokens))
                    print(f"  {name} concurrency {c}: {results[name][c]:.1f} tok/s", file=sys.stderr, flush=True)
        finally:
            native.stop()
            portable.stop()
    print(f"model {bundle.ref} ({bundle.digest[:19]}), {args.tokens} output tokens/request, {args.rounds} rounds")
    print(f"native:   {native_facts['system_info']}")
    print(f"portable: {portable_facts['system_info']}  (variant picked at run time)")
    print("conc | native tok/s | portable tok/s | portable/native")
    for c in levels:
        n, p = results["native"][c], results["portable"][c]
        print(f"{c:>4} | {n:12.1f} | {p:14.1f} | {p / n:15.3f}")


if __name__ == "__main__":
    main()
