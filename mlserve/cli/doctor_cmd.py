"""``mlserve doctor``: what this machine and build can do, and what to fix; exit 1 when a problem is found."""

from __future__ import annotations

import platform
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from mlserve.bench import sysinfo
from mlserve.bundles.store import Bundle, Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, human_size, info
from mlserve.errors import CheckFailed, MlserveError

MIN_FREE_DISK = 1 << 30
# Loading needs the weights plus KV cache and compute buffers; 20% headroom is a rough floor.
RAM_FACTOR = 1.2
GPU_REBUILD = 'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36'
NATIVE_REBUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=on" pip install --force-reinstall --no-cache-dir --no-binary llama-cpp-python '
    "llama-cpp-python==0.3.36"
)


def _problem(what: str, fix: str) -> dict[str, str]:
    return {"problem": what, "fix": fix}


def _build() -> tuple[dict[str, Any], list[dict[str, str]]]:
    try:
        from mlserve.engine.llama.factory import build_info

        build = build_info()
    except (ImportError, OSError, MlserveError) as exc:
        fix = "pip install --force-reinstall llama-cpp-python==0.3.36"
        return {"ok": False, "error": str(exc)}, [_problem(f"llama.cpp cannot be loaded: {exc}", fix)]
    compiled = {k.strip().lower(): v.strip() == "1" for k, v in re.findall(r"(\w+) = (\d)", build.system_info)}
    data = {
        "ok": True,
        "llama_cpp_python": build.version,
        "system_info": build.system_info,
        "gpu_offload": build.gpu_offload,
        "compiled": compiled,
    }
    problems = []
    if not build.gpu_offload and (shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists()):
        problems.append(_problem("An NVIDIA GPU is present but this llama.cpp build has no GPU offload.", GPU_REBUILD))
    has = sysinfo.cpu_flags()
    unused = [f for f in ("avx2", "fma", "f16c") if f in has and compiled and not compiled.get(f, True)]
    if unused:
        problems.append(
            _problem(f"llama.cpp was built without {', '.join(unused)}, which this CPU has.", NATIVE_REBUILD)
        )
    return data, problems


def _refetch(bundle: Bundle) -> str:
    """The command that removes a damaged bundle and fetches the same version again."""
    recipe = bundle.manifest.get("serving", {}).get("recipe")
    prov = bundle.manifest.get("provenance", {})
    rm = f"mlserve rm {bundle.ref} --force"
    pin = f"--name {bundle.name} --version {shlex.quote(bundle.version)}"
    if recipe:
        return f"{rm} && mlserve pull {shlex.quote(str(recipe))} {pin}"
    if prov.get("source") == "local" and prov.get("path"):
        return f"{rm} && mlserve pack {shlex.quote(str(prov['path']))} {pin}"
    return f"{rm} && mlserve pull SOURCE {pin}"


def _store(store: Store, verify: bool, mem: dict[str, int]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    bundles = store.bundles()
    problems = []
    rows = []
    if not bundles:
        problems.append(_problem(f"The store {store.root} holds no bundles.", "mlserve pull gemma3-270m"))
    for b in bundles:
        size = sum(int(f["size"]) for f in b.manifest["files"])
        issues = store.verify(b) if verify else []
        need = int(size * RAM_FACTOR)
        rows.append({"ref": b.ref, "size": size, "ok": not issues, "issues": issues, "ram_needed": need})
        if issues:
            problems.append(_problem(f"Bundle {b.ref} is damaged: {'; '.join(issues)}.", _refetch(b)))
        if mem["total"] and need > mem["total"]:
            problems.append(
                _problem(
                    f"{b.ref} needs about {human_size(need)} of RAM; this machine has {human_size(mem['total'])}.",
                    "mlserve pull RECIPE  # a smaller quantization of the model, e.g. Q4_K_M",
                )
            )
        elif mem["available"] and need > mem["available"]:
            problems.append(
                _problem(
                    f"{b.ref} needs about {human_size(need)} of RAM; only {human_size(mem['available'])} is free now.",
                    "Stop other memory-hungry processes (see `ps aux --sort=-rss | head`).",
                )
            )
    return {"root": str(store.root), "verified": verify, "bundles": rows}, problems


def diagnose(verify: bool = True) -> dict[str, Any]:
    """Everything doctor reports: facts, and a list of problems each with its fix."""
    store = Store()
    mem = sysinfo.memory()
    build, problems = _build()
    store_info, store_problems = _store(store, verify, mem)
    problems += store_problems
    free = sysinfo.disk_free(store.root)
    if free < MIN_FREE_DISK:
        problems.append(
            _problem(
                f"Only {human_size(free)} is free under {store.root}.",
                "export MLSERVE_HOME=/path/on/a/larger/disk  # or free space there",
            )
        )
    return {
        "ok": not problems,
        "llama_cpp": build,
        "cpu": {"model": sysinfo.cpu_model(), "arch": platform.machine(), "features": sysinfo.cpu_features()},
        "cores": sysinfo.cores(),
        "memory": mem,
        "disk": {"path": str(store.root), "free": free},
        "store": store_info,
        "problems": problems,
    }


def _render(report: dict[str, Any]) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    build = report["llama_cpp"]
    feats = report["cpu"]["features"]
    rows = [
        ("llama-cpp-python", str(build.get("llama_cpp_python") or "-")),
        ("llama.cpp", build.get("system_info") or f"NOT LOADABLE: {build.get('error')}"),
        ("GPU offload", "compiled in" if build.get("gpu_offload") else "not compiled in (CPU only)"),
        ("CPU", f"{report['cpu']['model']} ({report['cpu']['arch']})"),
        ("CPU features", " ".join(f"{k}{'+' if v else '-'}" for k, v in feats.items())),
        ("cores", f"{report['cores']['usable']} usable of {report['cores']['logical']}"),
        ("RAM", f"{human_size(report['memory']['available'])} available of {human_size(report['memory']['total'])}"),
        ("disk", f"{human_size(report['disk']['free'])} free under {report['disk']['path']}"),
    ]
    for b in report["store"]["bundles"]:
        state = ("ok" if b["ok"] else "DAMAGED") if report["store"]["verified"] else "not verified"
        rows.append(
            (f"bundle {b['ref']}", f"{human_size(b['size'])}, needs ~{human_size(b['ram_needed'])} RAM, {state}")
        )
    table = Table(show_header=False, box=None)
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    for p in report["problems"]:
        info(f"problem: {p['problem']}")
        info(f"  fix: {p['fix']}")


@app.command()
def doctor(
    quick: bool = typer.Option(False, "--quick", help="Skip re-hashing the bundles."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Check the llama.cpp build, GPU offload, CPU features, memory versus bundles, store integrity and disk.

    Each problem comes with the command that fixes it. Exit 0 when none is found, 1 otherwise.
    """
    report = diagnose(verify=not quick)
    if as_json:
        emit_json(report)
    else:
        _render(report)
    n = len(report["problems"])
    if n:
        raise CheckFailed(f"doctor found {n} problem{'s' if n > 1 else ''}.", "Run the fix shown for each one.")
    if not as_json:
        info("no problems found")
