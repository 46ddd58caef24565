"""--mode=view: a browser page of what the classifier decided, from a prediction file (or a folder of
shard files) or from a live run's --publish stream. A process of its own: a page being open never costs
the classifier anything.

    python airynet.py --mode=view --view_source=predictions/helium.h5
    python airynet.py --mode=view --view_source=tcp://sorter:4600 --view_socket=SUB

The JSON API (docs/view.md):
    GET /api/summary                     shots, counts per class, share of hits, the source's state
    GET /api/shots?cls=&prob=&min=&max=&sort=&offset=&limit=
                                         {"total", "shots": [{"id", "bunch_id", "pulse", "probabilities",
                                          "classes", ...}]}, newest first or by `sort`'s probability
    GET /api/shots/ID                    one shot, with the classes that have maps
    GET /api/shots/ID/image.png[?map=CLASS]   its image on a log scale, with the map of CLASS over it
    GET /api/ids.txt?(the filters)       bunch_id, pulse and id of every selected shot, one per line
"""
import math

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from nn.web import render, server

ASSETS = ("view.html", "view.js", "view.css")
MAX_LIMIT = 500  # shots per page at most


class BadRequest(Exception):
    """A query the API cannot answer: 400 with the message."""


def open_source(source, socket_type):
    """The source --view_source names: a stream for tcp://, else prediction files."""
    if source.startswith("tcp://"):
        from nn.web.stream import StreamSource
        return StreamSource(source, socket_type)
    from nn.web.h5source import FileSource
    return FileSource(source)


def summary(source):
    """GET /api/summary's answer."""
    source.refresh()
    answer = source.status()
    table = source.table
    if table is None:
        return {"shots": 0, "classes": {}, "hits": 0, "hit_share": None, "class_names": [], **answer}
    counts, shots, hits = table.counts_by_name()
    return {"shots": shots, "classes": counts, "hits": hits, "hit_share": round(hits / shots, 4) if shots else None,
            "class_names": table.class_names, "held": table.length, **answer}


def _class(table, params, name):
    value = params.get(name)
    if value in (None, ""):
        return None
    if value not in table.class_names:
        raise BadRequest(f"{name}={value}: no such class; the classes are {', '.join(table.class_names)}")
    return table.class_names.index(value)


def _number(params, name, default, low, high):
    try:
        value = float(params.get(name, default))
    except ValueError:
        raise BadRequest(f"{name}={params.get(name)}: not a number") from None
    if not (low <= value <= high) or math.isnan(value):
        raise BadRequest(f"{name}={params.get(name)}: must be within [{low}, {high}]")
    return value


def query(table, params):
    """select()'s arguments from the request's parameters cls, prob (default: cls), min, max, sort."""
    cls = _class(table, params, "cls")
    prob = _class(table, params, "prob")
    return {"cls": cls, "prob": cls if prob is None else prob, "sort": _class(table, params, "sort"),
            "bounds": (_number(params, "min", 0, 0, 1), _number(params, "max", 1, 0, 1))}


def build_app(source, token=None):
    """The Starlette app of the view of `source`, guarded by `token` (None: no guard)."""
    def table_or_empty():
        source.refresh()
        return source.table

    async def api_summary(request):
        return JSONResponse(summary(source))

    async def api_shots(request):
        table = table_or_empty()
        if table is None:
            return JSONResponse({"total": 0, "shots": []})
        params = request.query_params
        offset = int(_number(params, "offset", 0, 0, 2 ** 62))
        limit = int(_number(params, "limit", 50, 1, MAX_LIMIT))
        total, shots = table.page(query(table, params), offset, limit)
        return JSONResponse({"total": total, "offset": offset, "shots": shots})

    async def api_ids(request):
        table = table_or_empty()
        text = "" if table is None else table.id_text(query(table, request.query_params))
        return PlainTextResponse("# bunch_id\tpulse\tid\n" + text,
                                 headers={"Content-Disposition": 'attachment; filename="airynet_shots.txt"'})

    def find(request):
        table = table_or_empty()
        shot_id = request.path_params["shot_id"]
        row = None if table is None else table.row(shot_id)
        if row is None:
            raise LookupError(shot_id)
        return table, row, shot_id

    def api_shot(request):  # plain functions run in Starlette's thread pool: file reads never hold up the API
        table, row, shot_id = find(request)
        shot = table.shot(row)
        shot["maps"] = [n for c, n in enumerate(table.class_names) if source.heat(shot_id, c) is not None]
        shot["image"] = source.image(shot_id) is not None
        return JSONResponse(shot)

    def api_image(request):
        table, _, shot_id = find(request)
        image = source.image(shot_id)
        if image is None:
            return PlainTextResponse("this shot has no image in the source", status_code=404)
        heat = None
        if request.query_params.get("map"):
            heat = source.heat(shot_id, _class(table, request.query_params, "map"))
            if heat is None:
                return PlainTextResponse("this shot has no map of that class", status_code=404)
        return Response(render.png(image, heat), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})  # a shot's pictures never change

    routes = [Route("/api/summary", api_summary), Route("/api/shots", api_shots), Route("/api/ids.txt", api_ids),
              Route("/api/shots/{shot_id}", api_shot), Route("/api/shots/{shot_id}/image.png", api_image),
              *server.static_routes(ASSETS, index="view.html")]
    handlers = {BadRequest: lambda r, e: PlainTextResponse(str(e), status_code=400),
                LookupError: lambda r, e: PlainTextResponse(f"no shot {e} in this source", status_code=404)}
    return Starlette(routes=routes, middleware=[Middleware(server.TokenGuard, token=token)],
                     exception_handlers=handlers)


def run(cfg):
    """Serve the view of --view_source until SIGINT or SIGTERM; returns 0."""
    sock = server.listen(cfg.view_host, cfg.view_port)  # first: a busy port fails before the source is read
    source = open_source(cfg.view_source, cfg.view_socket)
    token = None if server.is_loopback(cfg.view_host) else server.new_token()
    try:
        server.serve(build_app(source, token), sock, cfg.view_host, token)
    finally:
        if source.kind == "stream":
            source.close()
        sock.close()
    return 0
