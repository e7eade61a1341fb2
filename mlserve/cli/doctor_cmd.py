"""``mlserve doctor``: what this machine and build can do, and what to fix; exit 1 when a problem is found.

The build is probed in a child process (engine/llama/hardware.py), so a llama.cpp compiled for a
newer CPU shows up as a finding here instead of an illegal-instruction crash.
"""

from __future__ import annotations

import platform
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mlserve.bench import sysinfo
from mlserve.bundles.store import Bundle, Store
from mlserve.cli.app import app
from mlserve.cli.console import emit_json, human_size, info
from mlserve.errors import CheckFailed, UsageError
from mlserve.kit.cpu import PORTABLE_FIX

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
    """The llama.cpp build as a child process sees it: a build for a newer CPU is found, not suffered."""
    from mlserve.engine.llama import hardware

    found = hardware.probe()
    if found.facts is None:
        if found.illegal_instruction:
            what = f"{found.error}; `mlserve serve` would crash the same way."
            return {"ok": False, "error": found.error}, [_problem(what, PORTABLE_FIX)]
        fix = "pip install --force-reinstall llama-cpp-python==0.3.36"
        return {"ok": False, "error": found.error}, [_problem(f"{found.error}.", fix)]
    facts = found.facts
    compiled = {k.lower(): v for k, v in facts.compiled.items()}
    data = {
        "ok": True,
        "llama_cpp_python": facts.version,
        "system_info": facts.system_info,
        "gpu_offload": facts.gpu_offload,
        "backend": facts.backend,
        "backends": list(facts.backends),
        "devices": list(facts.devices),
        "compiled": compiled,
        "cpu_dispatch": facts.dispatch,
        "cpu_needs": hardware.needed_features(facts),
    }
    problems = []
    if not facts.gpu_offload and (shutil.which("nvidia-smi") or Path("/dev/nvidia0").exists()):
        problems.append(_problem("An NVIDIA GPU is present but this llama.cpp build has no GPU offload.", GPU_REBUILD))
    missing = hardware.cpu_mismatch(facts)
    if missing:
        problems.append(
            _problem(
                f"This llama.cpp build needs {', '.join(missing)}, which this CPU lacks: it was built for a newer "
                "CPU and would die with an illegal instruction.",
                PORTABLE_FIX,
            )
        )
    has = sysinfo.cpu_flags()
    unused = [f for f in ("avx2", "fma", "f16c") if f in has and compiled and not compiled.get(f, True)]
    if unused and not facts.dispatch:
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


@dataclass(frozen=True)
class Plan:
    """The serving shape memory is checked for; None: each bundle's recipe default, else serve's."""

    ctx_size: int | None = None
    parallel: int | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None


def _needs(store: Store, b: Bundle, plan: Plan) -> dict[str, Any]:
    """Weights + KV cache (ctx x parallel x cache type bytes) of ``b`` served as ``plan`` says."""
    from mlserve.engine.llama.hardware import kv_cache_bytes

    defaults = b.manifest.get("serving", {}).get("defaults", {})
    ctx = plan.ctx_size or int(defaults.get("ctx_size") or 4096)
    parallel = plan.parallel or int(defaults.get("parallel") or 8)
    type_k = plan.cache_type_k or str(defaults.get("cache_type_k") or "f16")
    type_v = plan.cache_type_v or str(defaults.get("cache_type_v") or "f16")
    weights = sum(int(f["size"]) for f in b.manifest["files"])
    kv = kv_cache_bytes(store.blob_path(b.model_sha256), ctx * parallel, type_k, type_v)
    return {
        "weights": weights,
        "kv_cache": kv,
        "ctx_size": ctx,
        "parallel": parallel,
        "cache_type_k": type_k,
        "cache_type_v": type_v,
    }


def _gpu_fit(b: Bundle, need: dict[str, Any], gpus: list[dict[str, Any]]) -> tuple[Any, list[dict[str, str]]]:
    if not gpus or need["kv_cache"] is None:
        return None, []
    gpu = gpus[0]
    total = need["weights"] + need["kv_cache"]
    fit = {"device": gpu["name"], "needed": total, "free": gpu["free"], "fits": total <= gpu["free"]}
    if fit["fits"]:
        return fit, []
    what = (
        f"{b.ref} needs {human_size(total)} on {gpu['name']} (weights + KV cache of {need['ctx_size']} x "
        f"{need['parallel']} cells, {need['cache_type_k']}/{need['cache_type_v']}); {human_size(gpu['free'])} is free."
    )
    fix = (
        f"mlserve serve {b.ref} --gpu-layers auto  # offloads what fits; or shrink the cache: "
        "--flash-attn on --cache-type-k q8_0 --cache-type-v q8_0, or a smaller --ctx-size/--parallel"
    )
    return fit, [_problem(what, fix)]


def _store(
    store: Store, verify: bool, mem: dict[str, int], plan: Plan, gpus: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    from mlserve.deploy.memory import RUNTIME_BYTES

    bundles = store.bundles()
    problems = []
    rows = []
    if not bundles:
        problems.append(_problem(f"The store {store.root} holds no bundles.", "mlserve pull gemma3-270m"))
    for b in bundles:
        needs = _needs(store, b, plan)
        size = needs["weights"]
        issues = store.verify(b) if verify else []
        # Weights + KV cache + runtime when the GGUF says its KV shape; else a rough 20% on top.
        kv = needs["kv_cache"]
        need = size + kv + RUNTIME_BYTES if kv is not None else int(size * RAM_FACTOR)
        gpu_fit, gpu_problems = _gpu_fit(b, needs, gpus)
        rows.append(
            {"ref": b.ref, "size": size, "ok": not issues, "issues": issues, "ram_needed": need, **needs}
            | {"gpu_fit": gpu_fit}
        )
        problems += gpu_problems
        if issues:
            problems.append(_problem(f"Bundle {b.ref} is damaged: {'; '.join(issues)}.", _refetch(b)))
        if gpu_fit is not None:
            continue  # served from the GPU: host RAM holds only what is not offloaded
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


def diagnose(verify: bool = True, plan: Plan | None = None) -> dict[str, Any]:
    """Everything doctor reports: facts, and a list of problems each with its fix."""
    store = Store()
    mem = sysinfo.memory()
    build, problems = _build()
    gpus = [d for d in build.get("devices", []) if d["kind"] in ("gpu", "igpu")]
    store_info, store_problems = _store(store, verify, mem, plan or Plan(), gpus)
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


def _backend_line(build: dict[str, Any]) -> str:
    if not build.get("ok"):
        return "unknown (llama.cpp did not load)"
    if not build.get("gpu_offload"):
        return "CPU only: this llama.cpp build has no GPU backend, so GPU flags are refused"
    return f"{build['backend']} (GPU offload compiled in)"


def _device_rows(build: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            f"device {d['name']}",
            f"{d['kind']}, {d['description']}, {human_size(d['free'])} free of {human_size(d['total'])}",
        )
        for d in build.get("devices", [])
    ]


def _needs_line(build: dict[str, Any]) -> str:
    if not build.get("ok"):
        return "-"
    if build.get("cpu_dispatch"):
        return "baseline x86-64/armv8 only: the best CPU variant is picked at run time (portable build)"
    return " ".join(build.get("cpu_needs") or []) or "nothing beyond the baseline"


def _render(report: dict[str, Any]) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    build = report["llama_cpp"]
    feats = report["cpu"]["features"]
    rows = [
        ("llama-cpp-python", str(build.get("llama_cpp_python") or "-")),
        ("llama.cpp", build.get("system_info") or f"NOT LOADABLE: {build.get('error')}"),
        ("backend", _backend_line(build)),
        *_device_rows(build),
        ("CPU", f"{report['cpu']['model']} ({report['cpu']['arch']})"),
        ("CPU features", " ".join(f"{k}{'+' if v else '-'}" for k, v in feats.items())),
        ("build needs", _needs_line(build)),
        ("cores", f"{report['cores']['usable']} usable of {report['cores']['logical']}"),
        ("RAM", f"{human_size(report['memory']['available'])} available of {human_size(report['memory']['total'])}"),
        ("disk", f"{human_size(report['disk']['free'])} free under {report['disk']['path']}"),
    ]
    for b in report["store"]["bundles"]:
        state = ("ok" if b["ok"] else "DAMAGED") if report["store"]["verified"] else "not verified"
        fit = b.get("gpu_fit")
        where = (
            f"needs {human_size(fit['needed'])} of {human_size(fit['free'])} free on {fit['device']}"
            f" ({'fits' if fit['fits'] else 'DOES NOT FIT'})"
            if fit
            else f"needs ~{human_size(b['ram_needed'])} RAM"
        )
        rows.append((f"bundle {b['ref']}", f"{human_size(b['size'])}, {where}, {state}"))
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
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", min=16, help="Check memory for this context size."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, max=256, help="... and this many sequences."),
    cache_type_k: Optional[str] = typer.Option(None, "--cache-type-k", help="... and this K cache type."),
    cache_type_v: Optional[str] = typer.Option(None, "--cache-type-v", help="... and this V cache type."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Check the llama.cpp build, GPU offload, CPU features, memory versus bundles, store integrity and disk.

    Each problem comes with the command that fixes it. Exit 0 when none is found, 1 otherwise.
    """
    from mlserve.engine.llama.gpu import CACHE_TYPES

    for flag, value in (("--cache-type-k", cache_type_k), ("--cache-type-v", cache_type_v)):
        if value is not None and value not in CACHE_TYPES:
            raise UsageError(f"{flag} must be one of {', '.join(CACHE_TYPES)}, not {value!r}.")
    report = diagnose(verify=not quick, plan=Plan(ctx_size, parallel, cache_type_k, cache_type_v))
    if as_json:
        emit_json(report)
    else:
        _render(report)
    n = len(report["problems"])
    if n:
        raise CheckFailed(f"doctor found {n} problem{'s' if n > 1 else ''}.", "Run the fix shown for each one.")
    if not as_json:
        info("no problems found")
