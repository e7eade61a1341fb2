"""Air-gapped install kits: one tar of wheels, bundles, recipes, checksums and an install script.

``build.py`` makes a kit on a machine with internet, ``baseline.py`` picks (or builds) the
llama-cpp-python wheel for a named CPU baseline, ``verify.py`` checks every byte of a kit into a
staging folder, ``install.py`` installs it offline into a venv, ``script.py`` is the install.sh
a machine without mlserve runs.
"""
