"""The web layer of AiryNet's browser pages (--mode=view): a listening socket, the token that guards a
page served beyond loopback, the static assets and the server loop. The pages' routes live with their
modes; this module knows nothing of predictions.

    sock = listen(cfg.view_host, cfg.view_port)
    token = None if is_loopback(cfg.view_host) else new_token()
    app = Starlette(routes=[*my_routes, *static_routes(["view.html", "view.js"])],
                    middleware=[Middleware(TokenGuard, token=token)])
    serve(app, sock, cfg.view_host, token)

Starlette on uvicorn was chosen by measurement (docs/view.md, scripts/benchmark_web.py): fewer and
smaller packages than aiohttp; both cost well under a millisecond of CPU a request.
"""
import hmac
import http.cookies
import ipaddress
import logging
import os
import secrets
import socket
import urllib.parse

import uvicorn
from starlette.responses import FileResponse, PlainTextResponse
from starlette.routing import Route

from nn.config import AiryNetError

log = logging.getLogger("airynet")

DEFAULT_PORTS = range(8600, 8610)  # --view_port's default: the first free of these
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
COOKIE = "airynet_token"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


def is_loopback(host):
    """Whether `host` (a name or an address) is reachable only from this machine; "localhost" counts."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host, port=None):
    """A TCP socket bound to (host, port) and listening. port None: the first free of DEFAULT_PORTS.
    A busy or forbidden explicit port, a host that cannot be bound, or no free default port is an
    AiryNetError naming --view_port or --view_host."""
    for candidate in ([port] if port is not None else DEFAULT_PORTS):
        try:
            info = socket.getaddrinfo(host, candidate, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            raise AiryNetError(f"--view_host={host}: cannot resolve it ({e.strerror})") from e
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT from a last run
        try:
            sock.bind(info[4])
        except OSError as e:
            sock.close()
            if port is None and e.errno in (98, 13):  # EADDRINUSE, EACCES: try the next default
                continue
            flag = f"--view_port={candidate}" if e.errno in (98, 13) else f"--view_host={host}"
            raise AiryNetError(f"{flag}: cannot listen on {host}:{candidate} ({e.strerror})") from e
        sock.listen(128)
        sock.set_inheritable(True)
        return sock
    raise AiryNetError(f"--view_port: none of the default ports {DEFAULT_PORTS.start}..{DEFAULT_PORTS.stop - 1} "
                       f"is free on {host}; pass --view_port=PORT")


def new_token():
    """A random token (32 bytes of the OS's randomness, URL-safe text) for a page served beyond loopback."""
    return secrets.token_urlsafe(32)


class TokenGuard:
    """ASGI middleware: with a token, every HTTP request must carry it as `?token=`, an `Authorization:
    token ...` header or the cookie that a request with a valid `?token=` sets (so that the page's own
    requests need not repeat it); anything else is answered 403. Without a token (a loopback view) a
    request passes when its Host header names a loopback host: a web page elsewhere that points its own
    name at 127.0.0.1 (DNS rebinding) is refused. Tokens are compared in constant time."""

    def __init__(self, app, token=None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token is None:
            if is_loopback(self._host(scope)):
                return await self.app(scope, receive, send)
            return await PlainTextResponse("403: this view answers only to a loopback host name",
                                           status_code=403)(scope, receive, send)
        from_query = self._matches(self._query_token(scope))
        if not (from_query or self._matches(self._header_token(scope)) or self._matches(self._cookie(scope))):
            return await PlainTextResponse("403: this view needs its token (see the URL it logged at start)",
                                           status_code=403)(scope, receive, send)
        if not from_query:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)
        return await self.app(scope, receive, send_with_cookie)

    def _matches(self, candidate):
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token.encode())

    @staticmethod
    def _query_token(scope):
        values = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return values[-1] if values else None

    @staticmethod
    def _header_token(scope):
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                kind, _, token = value.decode("latin-1").partition(" ")
                if kind.lower() == "token":
                    return token.strip()
        return None

    @staticmethod
    def _host(scope):
        """The host name of the Host header ("" without one), brackets of an IPv6 address removed."""
        for name, value in scope.get("headers", []):
            if name == b"host":
                return urllib.parse.urlsplit("//" + value.decode("latin-1")).hostname or ""
        return ""

    @staticmethod
    def _cookie(scope):
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                jar = http.cookies.SimpleCookie()
                try:
                    jar.load(value.decode("latin-1"))
                except http.cookies.CookieError:
                    return None
                if COOKIE in jar:
                    return jar[COOKIE].value
        return None


def static_routes(names, index=None):
    """Routes for the files `names` of nn/web/static/, each at /static/NAME (and `index` at /): the
    allow-list is fixed when the app is built, so no path from a request ever reaches the file system."""
    routes = []
    for name in names:
        path = os.path.join(STATIC_DIR, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise ValueError(f"{name}: not a file of {STATIC_DIR}")
        media = MEDIA_TYPES[os.path.splitext(name)[1]]
        endpoint = _file_endpoint(path, media)
        routes.append(Route(f"/static/{name}", endpoint))
        if name == index:
            routes.append(Route("/", endpoint))
    return routes


def _file_endpoint(path, media_type):
    async def endpoint(request):
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})
    return endpoint


def url(sock, host, token=None):
    """The address a user opens: http://HOST:PORT/ with ?token=... when the view needs one."""
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
        # The first SIGINT/SIGTERM stops the view cleanly and it returns; uvicorn's own handler would
        # raise the signal again once stopped, so that the process died by it. A second one forces the stop.
        self.force_exit = self.should_exit
        self.should_exit = True


def serve(app, sock, host, token=None):
    """Log `Serving URL` (one line) and run `app` with uvicorn on the listening `sock` until SIGINT or
    SIGTERM, which stop it cleanly (open connections closed) and return."""
    server = _Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    log.info("Serving %s", url(sock, host, token))
    server.run(sockets=[sock])
