"""The install.sh a kit carries, for a machine that has Python but no mlserve (POSIX sh, coreutils)."""

from __future__ import annotations

INSTALL_SH = r"""#!/bin/sh
# Install this mlserve kit offline: verify every file, check Python and CPU, create a venv,
# install the wheels with pip --no-index, import the bundles. Nothing is fetched from a network.
#   sh install.sh [VENV_DIR]        (default: ./mlserve-venv; PYTHON=python3.11 to pick the interpreter)
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-mlserve-venv}
PYTHON=${PYTHON:-python3}
cd "$KIT"
echo "verifying every file against SHA256SUMS" >&2
if ! sha256sum --quiet --strict -c SHA256SUMS; then
    echo "error: the kit is damaged or altered; nothing was installed." >&2
    exit 2
fi
"$PYTHON" - <<'EOF' || exit 2
import json, platform, sys
kit = json.load(open("kit.json"))
want, have = kit["python"]["version"], "%d.%d" % sys.version_info[:2]
if want != have:
    sys.exit(f"error: this kit is for Python {want}; {sys.executable} is {have}. Set PYTHON=python{want}.")
plat = kit["platform"]
if (platform.system(), platform.machine()) != (plat["system"], plat["machine"]):
    here = f"{platform.system()} {platform.machine()}"
    sys.exit(f"error: this kit is for {plat['system']} {plat['machine']}, not {here}.")
flags = set()
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
except OSError:
    pass
missing = [f for f in kit["cpu_baseline"]["needs"] if flags and f not in flags]
if missing:
    sys.exit(f"error: this kit's llama.cpp needs CPU features {', '.join(missing)}, which this CPU lacks. "
             "Build the kit with --baseline portable.")
EOF
case "$VENV" in /*) ;; *) VENV="$OLDPWD/$VENV" ;; esac
if [ -e "$VENV" ]; then echo "error: $VENV exists; pick a new folder." >&2; exit 2; fi
STAGE="$VENV.partial"
rm -rf "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
"$PYTHON" -m venv "$STAGE"
"$STAGE/bin/python" -m pip install --quiet --no-index --find-links "$KIT/wheels" --only-binary :all: \
    --disable-pip-version-check mlserve
# Scripts name their interpreter by absolute path: point them at the final folder, then move it there.
grep -rlF "$STAGE" "$STAGE/bin" | while read -r f; do sed -i "s|$STAGE|$VENV|g" "$f"; done
mv "$STAGE" "$VENV"
trap - EXIT
for b in "$KIT"/bundles/*.tar; do
    [ -e "$b" ] && "$VENV/bin/mlserve" import "$b"
done
echo "installed: $VENV/bin/mlserve" >&2
"""
