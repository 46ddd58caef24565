#!/usr/bin/env python3
"""The web stack of --mode=view, chosen by measurement: Starlette on uvicorn against aiohttp.

Each server runs in a process of its own and answers the two requests the page makes most: a JSON
summary (about 1 KB) and a shot's PNG (a 64x64 image, about 5 KB). A keep-alive client in this process
sends --requests of each; the figure is the server process's CPU time (user + system, from psutil) per
request, the median of --repeats rounds. Also: the packages each stack adds to this project's
requirements and their size on disk (MiB).

    python scripts/benchmark_web.py --requests=2000 --repeats=3
"""
import argparse
import http.client
import importlib.metadata
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil
from PIL import Image

SERVERS = {
    "starlette+uvicorn": '''
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
body, png = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
app = Starlette(routes=[Route("/json", lambda r: Response(body, media_type="application/json")),
                        Route("/png", lambda r: Response(png, media_type="image/png"))])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
''',
    "aiohttp": '''
import sys
from aiohttp import web
body, png = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
async def js(r): return web.Response(body=body, content_type="application/json")
async def im(r): return web.Response(body=png, content_type="image/png")
app = web.Application(); app.add_routes([web.get("/json", js), web.get("/png", im)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
''',
}
# The packages each stack brings that this project's requirements do not already hold.
PACKAGES = {"starlette+uvicorn": ["starlette", "anyio", "uvicorn", "h11", "click"],
            "aiohttp": ["aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "multidict",
                        "propcache", "yarl"]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def payloads(directory):
    """A summary-sized JSON body and a 64x64 PNG, written to files the servers read."""
    summary = {"shots": 100000, "classes": {f"class_{i}": 1000 * i for i in range(11)},
               "shots_page": [{"id": str(i), "probabilities": [0.5] * 11} for i in range(4)]}
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(out, "PNG")
    paths = [os.path.join(directory, "body.json"), os.path.join(directory, "image.png")]
    for path, data in zip(paths, (json.dumps(summary).encode(), out.getvalue())):
        with open(path, "wb") as f:
            f.write(data)
    return paths


def wait_listening(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


def cpu_per_request(name, paths, requests):
    """Microseconds of the server's CPU per request (JSON and PNG alternately), after a warm-up."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVERS[name], str(port), *paths])
    try:
        wait_listening(port)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        server = psutil.Process(proc.pid)
        for i in range(200 + requests):
            if i == 200:
                start = server.cpu_times()
            conn.request("GET", "/json" if i % 2 else "/png")
            conn.getresponse().read()
        end = server.cpu_times()
        conn.close()
        return 1e6 * (end.user + end.system - start.user - start.system) / requests
    finally:
        proc.terminate()
        proc.wait()


def installed_mib(packages):
    total = 0
    for name in packages:
        dist = importlib.metadata.distribution(name)
        total += sum(os.path.getsize(dist.locate_file(f)) for f in dist.files or []
                     if os.path.isfile(dist.locate_file(f)))
    return total / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work_dir", default="/tmp")
    args = parser.parse_args()
    paths = payloads(args.work_dir)
    for name in SERVERS:
        rounds = [cpu_per_request(name, paths, args.requests) for _ in range(args.repeats)]
        print(f"{name:18s} server CPU {statistics.median(rounds):6.0f} us/request (median of {args.repeats}: "
              f"{', '.join(f'{r:.0f}' for r in rounds)}); adds {len(PACKAGES[name])} packages, "
              f"{installed_mib(PACKAGES[name]):.1f} MiB: {' '.join(PACKAGES[name])}")


if __name__ == "__main__":
    main()
