"""Render deployment configuration (systemd, HAProxy, Kubernetes, KServe, Ray) from bundles: see plan.py."""
