"""LocalServer: the launcher `mlserve bench REF`, `eval` and the benchmark scripts start servers with."""

from __future__ import annotations

import textwrap
from pathlib import Path

import httpx

from mlserve.bench.local_server import LocalServer

# A stand-in `mlserve` package: `python -m mlserve serve ...` prints the line LocalServer waits for
# and answers /health/ready with the file it was imported from.
FAKE_MAIN = textwrap.dedent(
    """
    import http.server, sys

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = __file__.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(f"mlserve: listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
    """
)


def test_src_serves_that_trees_code_not_the_checkouts(tmp_path: Path) -> None:
    tree = tmp_path / "baseline"
    (tree / "mlserve").mkdir(parents=True)
    (tree / "mlserve" / "__init__.py").write_text("")
    (tree / "mlserve" / "__main__.py").write_text(FAKE_MAIN)
    # Run from the checkout, as the benchmarks are: PYTHONPATH alone would lose to ./mlserve here.
    with LocalServer("any-ref", [], start_timeout=30, src=tree) as server:
        served = httpx.get(server.url + "/health/ready", timeout=5).text
    assert Path(served).resolve() == (tree / "mlserve" / "__main__.py").resolve()
