"""``mlserve kit build|install``: one file that installs mlserve and its bundles on a machine with no network."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlserve.cli.app import app
from mlserve.cli.console import emit_json, human_size, info

JSON = typer.Option(False, "--json", help="Print one JSON document on stdout.")
kit_app = typer.Typer(help="Build and install air-gapped install kits.", no_args_is_help=True)
app.add_typer(kit_app, name="kit")


@kit_app.command("build")
def build_cmd(
    refs: Optional[list[str]] = typer.Argument(
        None, help="Bundles to carry (NAME, NAME:VERSION, ...); none: no models."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="The kit file to write (KIT.tar)."),
    baseline: str = typer.Option(
        "portable",
        "--baseline",
        help="CPU the llama.cpp build targets: portable (any x86-64, best variant picked at run time), "
        "native (this machine's CPU) or x86-64-v3 (AVX2 and newer).",
    ),
    llama_wheel: Optional[Path] = typer.Option(
        None, "--llama-wheel", exists=True, dir_okay=False, help="Use this llama-cpp-python wheel (checked)."
    ),
    mlserve_wheel: Optional[Path] = typer.Option(
        None, "--mlserve-wheel", exists=True, dir_okay=False, help="Use this mlserve wheel (default: build it)."
    ),
    no_build: bool = typer.Option(False, "--no-build", help="Fail instead of compiling llama-cpp-python."),
    as_json: bool = JSON,
) -> None:
    """Write one tar with wheels for mlserve and every dependency, the bundles, recipes, SHA256SUMS and install.sh.

    The wheels are for this machine's Python version and OS; build on one like the target.
    """
    from mlserve.kit.baseline import baseline as named
    from mlserve.kit.build import build

    result = build(list(refs or []), output, named(baseline), llama_wheel, mlserve_wheel, not no_build, info)
    m = result.manifest
    if as_json:
        emit_json({"path": str(result.path), "size": result.size, "digest": f"sha256:{result.digest}", **m})
        return
    info(
        f"wrote {result.path} ({human_size(result.size)}): {len(m['wheels'])} wheels, {len(m['bundles'])} bundle(s), "
        f"Python {m['python']['version']} {m['platform']['system']} {m['platform']['machine']}, "
        f"CPU baseline {m['cpu_baseline']['name']} (llama-cpp-python from {m['llama_cpp']['source']})"
    )
    info(f"kit digest sha256:{result.digest}  (install prints it too: compare them)")


@kit_app.command("install")
def install_cmd(
    kit: Path = typer.Argument(..., exists=True, dir_okay=False, help="A kit written by `mlserve kit build`."),
    venv: Optional[Path] = typer.Option(None, "--venv", help="The new venv to create (default: ./mlserve-venv)."),
    prefix: Optional[Path] = typer.Option(None, "--prefix", help="Same as --venv."),
    python: Optional[str] = typer.Option(None, "--python", help="Interpreter for the venv (default: this one)."),
    as_json: bool = JSON,
) -> None:
    """Verify every hash, check Python/platform/CPU, create the venv offline, and import the bundles.

    Nothing is fetched from a network; on any failure nothing is left installed.
    """
    from mlserve.errors import UsageError
    from mlserve.kit.install import install

    if venv is not None and prefix is not None and venv != prefix:
        raise UsageError("--venv and --prefix name the same thing; give one.")
    target = venv or prefix or Path("mlserve-venv")
    report = install(kit, target, python, info)
    if as_json:
        emit_json(report)
        return
    bundles = ", ".join(f"{b['name']}:{b['version']}" for b in report["bundles"]) or "no bundles"
    info(f"installed {report['mlserve']} in {report['seconds']} s; imported {bundles}")
    info(f"kit digest sha256:{report['digest']}")
