"""The web layer (nn/web/server.py) over real HTTP, and the pictures (nn/web/render.py)."""
import io
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from nn import config
from nn.config import AiryNetError
from nn.web import render, server


def _non_loopback_address():
    """An address of this machine other than loopback (the view then needs its token), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if server.is_loopback(address) else address


class Running:
    """An app served by server.serve's uvicorn settings in a thread, on a socket from server.listen."""

    def __init__(self, app, host, port=None):
        self.sock = server.listen(host, port)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


def _get(url, headers=None):
    """(status, headers, body) of a GET, 4xx included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def guarded():
    """A non-loopback server with a token, its address and the token."""
    host = _non_loopback_address()
    if host is None:
        pytest.skip("this machine has no address but loopback")
    token = server.new_token()
    app = Starlette(routes=[Route("/api/x", lambda r: JSONResponse({"ok": True})),
                            *server.static_routes(["view.html"], index="view.html")],
                    middleware=[Middleware(server.TokenGuard, token=token)])
    running = Running(app, host)
    yield f"http://{host}:{running.port}", token
    running.stop()


def test_token_in_query_header_or_cookie_else_403(guarded):
    base, token = guarded
    assert _get(base + "/api/x")[0] == 403
    assert _get(base + "/api/x?token=wrong")[0] == 403
    assert _get(base + "/api/x", {"Authorization": "token " + token[:-1]})[0] == 403
    assert _get(base + "/", {"Cookie": "airynet_token=nope"})[0] == 403
    status, headers, body = _get(base + "/api/x?token=" + token)
    assert status == 200 and body == b'{"ok":true}'
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"airynet_token={token};") and "HttpOnly" in cookie
    assert _get(base + "/api/x", {"Authorization": "token " + token})[0] == 200
    assert _get(base + "/api/x", {"Cookie": f"other=1; airynet_token={token}"})[0] == 200
    status, _, page = _get(base + "/", {"Cookie": f"airynet_token={token}"})
    assert status == 200 and page == open(f"{server.STATIC_DIR}/view.html", "rb").read()


def test_loopback_view_refuses_a_foreign_host_name():
    """Without a token (loopback), a request whose Host header is not a loopback name is refused (DNS rebinding)."""
    app = Starlette(routes=[Route("/api/x", lambda r: JSONResponse({"ok": True}))],
                    middleware=[Middleware(server.TokenGuard, token=None)])
    running = Running(app, "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{running.port}/api/x"
        assert _get(base)[0] == 200
        assert _get(base, {"Host": f"localhost:{running.port}"})[0] == 200
        assert _get(base, {"Host": f"[::1]:{running.port}"})[0] == 200
        status, _, body = _get(base, {"Host": f"attacker.example:{running.port}"})
        assert status == 403 and b"loopback" in body
    finally:
        running.stop()


def test_static_allow_list_only():
    app = Starlette(routes=server.static_routes(["view.html"], index="view.html"))
    running = Running(app, "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{running.port}"
        status, headers, body = _get(base + "/static/view.html")
        assert status == 200 and headers["content-type"].startswith("text/html") and b"<html" in body.lower()
        for path in ("/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py",
                     "/static/render.py", "/static//etc/passwd", "/server.py"):
            status, _, body = _get(base + path)
            assert status == 404 and b"import" not in body, path
    finally:
        running.stop()
    with pytest.raises(ValueError, match="not a file"):
        server.static_routes(["../server.py"])


def test_listen_default_range_and_busy_port():
    taken = [server.listen("127.0.0.1", port) for port in server.DEFAULT_PORTS[:2] if _free(port)]
    try:
        sock = server.listen("127.0.0.1")
        port = sock.getsockname()[1]
        assert port in server.DEFAULT_PORTS and port not in [t.getsockname()[1] for t in taken]
        with pytest.raises(AiryNetError, match=rf"^--view_port={port}: cannot listen on 127.0.0.1:{port} "):
            server.listen("127.0.0.1", port)
        sock.close()
    finally:
        for t in taken:
            t.close()
    with pytest.raises(AiryNetError, match="^--view_host=no.such.host.invalid: cannot resolve"):
        server.listen("no.such.host.invalid", 0)


def _free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_url_and_loopback():
    sock = server.listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    assert server.url(sock, "127.0.0.1") == f"http://127.0.0.1:{port}/"
    assert server.url(sock, "0.0.0.0", "abc") == f"http://0.0.0.0:{port}/?token=abc"
    sock.close()
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("10.1.2.3")
    tokens = {server.new_token() for _ in range(3)}
    assert len(tokens) == 3 and all(len(t) >= 40 for t in tokens)


def test_view_flags():
    cfg = config.parse_args(["--mode=view", "--view_source=x.h5"])
    assert (cfg.view_host, cfg.view_port, cfg.view_socket) == ("127.0.0.1", None, "SUB")
    assert {"view_host", "view_port", "view_source", "view_socket", "publish_images"} <= config.PER_INVOCATION
    for argv, message in ((["--mode=view"], "^--view_source: "), (["--view_port=70000"], "^--view_port=70000: "),
                          (["--mode=live", "--load_dir=r", "--bridge=tcp://h:1", "--publish_images=true"],
                           "^--publish_images=true: ")):
        with pytest.raises(AiryNetError, match=message):
            config.parse_args(argv)


def _log_scaled_reference(image):
    """log1p stretched to 255, written out pixel by pixel."""
    flat = [max(float(v), 0.0) for v in np.asarray(image, np.float64).ravel()]
    top = max(np.log1p(v) for v in flat)
    return np.array([round(np.log1p(v) * 255 / top) for v in flat]).reshape(np.shape(image))


def test_log_scaled_png_round_trip():
    rng = np.random.default_rng(1)
    image = rng.exponential(50, (32, 40)).astype(np.float32)
    image[0, 0] = -3
    decoded = np.asarray(Image.open(io.BytesIO(render.png(image))))
    assert decoded.shape == (32, 40) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - _log_scaled_reference(image)).max() <= 1
    assert decoded[0, 0] == 0 and decoded.max() == 255
    stored = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)  # what live mode publishes: kept as is
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(render.png(stored)))), stored[..., 0])
    assert not np.asarray(Image.open(io.BytesIO(render.png(np.zeros((8, 8)))))).any()


def test_overlay_colours_where_the_map_is():
    image = np.full((32, 32), 10.0, np.float32)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 5.0  # the top-left corner hot, the rest cold
    rgb = np.asarray(Image.open(io.BytesIO(render.png(image, heat))))
    assert rgb.shape == (32, 32, 3)
    gray = render.log_scaled(image)[0, 0]
    top_left, bottom_right = rgb[0, 0].astype(float), rgb[31, 31].astype(float)
    assert np.array_equal(bottom_right, [gray] * 3)  # no map: the image unchanged
    expected = gray * (1 - render.OVERLAY_ALPHA) + render.ANCHORS[-1] * render.OVERLAY_ALPHA
    assert np.abs(top_left - expected).max() <= 1
    assert np.array_equal(render.colour(np.array([0.0, 1.0, 0.5])),
                          render.ANCHORS[[0, -1, 2]].astype(np.uint8))


SERVE = """
import logging, sys
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from nn.web import server
logging.basicConfig(level="WARNING", format="%(message)s")
logging.getLogger("airynet").setLevel("INFO")
app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("up"))])
server.serve(app, server.listen("127.0.0.1", 0), "127.0.0.1", sys.argv[1] or None)
print("stopped", flush=True)
"""


@pytest.mark.parametrize("token", ["", "t0k"])
def test_serve_logs_one_line_and_stops_on_sigterm(token):
    import re
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", SERVE, token], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stderr.readline().strip()
    match = re.fullmatch(r"Serving http://127\.0\.0\.1:(\d+)/" + (r"\?token=t0k" if token else ""), line)
    assert match, line
    deadline = time.monotonic() + 10
    while _get(f"http://127.0.0.1:{match[1]}/")[2] != b"up" and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and out == "stopped\n" and err == ""
