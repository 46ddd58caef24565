"""--mode=label: the labelling page and its API (docs/labelling.md), on the web layer of nn/web/server.py
(--view_host, --view_port and the token rules of --mode=view).

    GET  /api/next      -> {"id", "bunch_id", "pulse", "probabilities", "thresholds", "remaining"} ("id": null
                           when none are left)
    POST /api/label     {"id", "classes": [0/1 x C]} or {"id", "not_a_droplet": true} -> 200 once on disk,
                           with the progress; 400 bad body, 404 unknown id, 409 already labelled,
                           422 a choice the class hierarchy refuses ({"error": why})
    GET  /api/progress  -> {"labelled", "total", "not_a_droplet", "classes": {name: count}}
    POST /api/skip      {"id"}: not offered again in this session
    POST /api/undo      -> {"id"}: the last label saved in this session taken back (null: none)
    GET  /api/image?id=            the shot on a log scale (PNG)
    GET  /api/cam?id=&class=       the network's input with the class's Grad-CAM++ map over it (PNG)
"""
import json
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nn.labelling.session import LabelError, Session
from nn.web import server

log = logging.getLogger("airynet")

STATIC = ["label.html", "label.js", "label.css"]


def make_app(session, token=None):
    async def call(fn, *args, **kwargs):
        try:
            result = await run_in_threadpool(fn, *args, **kwargs)
        except LabelError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        if isinstance(result, bytes):
            return Response(result, media_type="image/png", headers={"Cache-Control": "no-store"})
        return JSONResponse(result)

    async def body(request):
        try:
            value = json.loads(await request.body())
        except ValueError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("id"), str):
            raise LabelError(400, 'the body must be a JSON object with a string "id"')
        return value

    async def post(request, action):
        try:
            value = await body(request)
        except LabelError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        return await call(action, value)

    def label(value):
        if value.get("not_a_droplet") is True:
            return session.label(value["id"], not_a_droplet=True)
        return session.label(value["id"], value.get("classes"))

    def skip(value):
        session.skip(value["id"])
        return session.next()

    async def cam(request):
        try:
            cls = int(request.query_params.get("class", "0"))
        except ValueError:
            return JSONResponse({"error": "class must be an integer"}, status_code=400)
        return await call(session.cam_png, request.query_params.get("id", ""), cls)

    def endpoint(handler):  # Starlette awaits only functions declared async
        async def handle(request):
            return await handler(request)
        return handle

    routes = [Route("/api/next", endpoint(lambda r: call(session.next))),
              Route("/api/progress", endpoint(lambda r: call(session.progress))),
              Route("/api/label", endpoint(lambda r: post(r, label)), methods=["POST"]),
              Route("/api/skip", endpoint(lambda r: post(r, skip)), methods=["POST"]),
              Route("/api/undo", endpoint(lambda r: call(session.undo)), methods=["POST"]),
              Route("/api/image", endpoint(lambda r: call(session.image_png, r.query_params.get("id", "")))),
              Route("/api/cam", cam),
              Route("/api/classes", endpoint(lambda r: call(lambda: {"classes": session.names}))),
              *server.static_routes(STATIC, index="label.html")]
    return Starlette(routes=routes, middleware=[Middleware(server.TokenGuard, token=token)])


def run(cfg, recipe, model):
    session = Session(cfg, recipe, model)
    sock = server.listen(cfg.view_host, cfg.view_port)
    token = None if server.is_loopback(cfg.view_host) else server.new_token()
    progress = session.progress()
    log.info("Labelling %d shots of %s into %s (%d labelled, %d not droplets; order: --select=%s)",
             progress["total"], session.pool.source, cfg.labels, progress["labelled"], progress["not_a_droplet"],
             cfg.select)
    server.serve(make_app(session, token), sock, cfg.view_host, token)
    return 0
