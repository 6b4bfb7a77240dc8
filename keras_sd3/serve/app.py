"""The HTTP API of `keras-sd3 serve` (FastAPI): a thin layer over the `JobStore` and the `Worker`.

Handlers check a request completely (`keras_sd3.serve.requests`: the JSON fields, then the size and
the pictures against the model), queue it and answer 202 with the job id; the worker thread does all
model work.
Every 422 has FastAPI's shape: `{"detail": [{"loc": ["body", field], "msg": ..., ...}]}`.
"""

import asyncio
import contextlib
import functools
import json
import os
import re
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from keras_sd3.serve.requests import MAX_IMAGES, MAX_STEPS, GenerateRequest, resolve, validation_error
from keras_sd3.serve.store import FINISHED

MAX_BODY = 32 * 2**20
IMAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+\.png$")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
SSE_POLL, SSE_KEEPALIVE = 0.1, 15.0


def job_json(job):
    """A store job -> the API's Job object."""
    return {"id": job["id"], "state": job["state"], "position": job["position"],
            "progress": {"step": job["step"], "total": job["total"]}, "parameters": job["parameters"],
            "images": [f"/api/v1/images/{name}" for name in job["images"]], "error": job["error"],
            "created": job["created"], "finished": job["finished"]}


def sse(event, data):
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def job_events(store, job_id):
    """The event stream of a job: `progress` whenever it changes, then its final state with the Job."""
    last, quiet_since = None, time.monotonic()
    while True:
        job = await run_in_threadpool(store.get, job_id)
        if job["state"] in FINISHED:
            yield sse(job["state"], job_json(job))
            return
        progress = {"step": job["step"], "total": job["total"], "state": job["state"], "position": job["position"]}
        if progress != last:
            yield sse("progress", progress)
            last, quiet_since = progress, time.monotonic()
        elif time.monotonic() - quiet_since > SSE_KEEPALIVE:
            yield ": keep-alive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(SSE_POLL)


class BodyLimit:
    """ASGI middleware: 413 for a request body above `limit` bytes, by its Content-Length or by counting
    what arrives; the body read is then handed on to the app."""

    def __init__(self, app, limit=MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self.too_large(scope, receive, send)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        detail = f"the request body is larger than {self.limit // 2**20} MiB"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def require_key(request: Request):
    """The /api/v1 dependency: with an API key set, `Authorization: Bearer KEY` or `?access_token=KEY`."""
    key = request.app.state.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else request.query_params.get("access_token", "")
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or ?access_token=KEY",
                            headers={"WWW-Authenticate": "Bearer"})


def get_job(request, job_id):
    job = request.app.state.store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_key)])


@router.get("/info")
def info(request: Request):
    """The model and the limits of the requests."""
    state = request.app.state
    tasks = state.tasks
    num_steps, guidance_scale, _ = tasks.get("text-to-image", *tasks.native_size).settings(None, None, None)
    vocabulary = tasks.preprocessor.vocabulary if tasks.preprocessor else None
    return {"model": tasks.model, "backend": state.backend, "width": tasks.native_size[1],
            "height": tasks.native_size[0], "multiple": state.size_rule[0], "max_size": state.size_rule[1],
            "defaults": {"num_steps": num_steps, "guidance_scale": guidance_scale}, "max_steps": MAX_STEPS,
            "max_images": MAX_IMAGES, "vocabulary": None if vocabulary is None else sorted(vocabulary)}


@router.get("/health")
def health(request: Request):
    """The queue's length and whether the worker thread runs."""
    state = request.app.state
    counts = state.store.counts()
    return {"status": "ok", "model": state.tasks.model, "backend": state.backend, "queued": counts["queued"],
            "running": counts["running"], "worker": "alive" if state.worker.is_alive() else "dead"}


@router.post("/generate", status_code=202)
def generate(body: GenerateRequest, request: Request):
    """Checks and queues a job; answers its id."""
    state = request.app.state
    parameters, batch_key, total, image, mask = resolve(body, state.tasks, state.size_rule)
    return {"id": state.store.add(parameters, batch_key, total, image, mask)}


@router.get("/jobs")
def jobs(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20, before: str | None = None):
    """The jobs, newest first; `before` (an id) gives the page after it."""
    try:
        return {"jobs": [job_json(job) for job in request.app.state.store.list(limit, before)]}
    except KeyError:
        raise HTTPException(404, f"no job {before}") from None


@router.get("/jobs/{job_id}")
def job(job_id: str, request: Request):
    return job_json(get_job(request, job_id))


@router.get("/jobs/{job_id}/events")
def events(job_id: str, request: Request):
    """Server-sent events: the job's progress, then its final state (`job_events`)."""
    get_job(request, job_id)
    return StreamingResponse(job_events(request.app.state.store, job_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete("/jobs/{job_id}")
def cancel(job_id: str, request: Request):
    """Cancels a queued job at once, a running one at its next step; 409 for a finished job."""
    state = request.app.state.store.cancel(job_id)
    if state is None:
        raise HTTPException(404, f"no job {job_id}")
    if state in FINISHED:
        raise HTTPException(409, f"job {job_id} is already {state}")
    return job_json(get_job(request, job_id))


@router.get("/images/{name}")
def image(name: str, request: Request):
    """A generated PNG: only a file directly in outputs/images, by a plain name."""
    folder = os.path.realpath(os.path.join(request.app.state.outputs, "images"))
    path = os.path.join(folder, name)
    if not IMAGE_NAME.fullmatch(name) or not os.path.isfile(path) or os.path.dirname(os.path.realpath(path)) != folder:
        raise HTTPException(404, f"no image {name}")
    return FileResponse(path, media_type="image/png")


@contextlib.asynccontextmanager
async def lifespan(app):
    """Loads the model and opens the store before the first request; stops the worker at the end."""
    from keras_sd3 import backend_name
    from keras_sd3.models.backbone import image_size_rule
    from keras_sd3.serve.store import JobStore
    from keras_sd3.serve.worker import TaskCache, Worker

    state, settings = app.state, app.state.settings
    os.makedirs(os.path.join(settings["outputs"], "images"), exist_ok=True)
    state.tasks = await run_in_threadpool(functools.partial(TaskCache, settings["model"], **settings["load"]))
    state.size_rule = image_size_rule(state.tasks.backbone.mmdit_config, state.tasks.backbone.vae_config)
    state.backend = backend_name()
    state.store = JobStore(os.path.join(settings["outputs"], "jobs.sqlite3"))
    state.store.recover()
    state.worker = Worker(state.store, state.tasks, settings["outputs"], settings["max_batch"])
    if settings["start_worker"]:
        state.worker.start()
    try:
        yield
    finally:
        state.worker.stop()
        state.store.close()


def create_app(model="sd3_tiny_shapes", outputs="outputs", max_batch=4, api_key=None, start_worker=True,
               **load):
    """The FastAPI app of `keras-sd3 serve`; the model is loaded when the app starts (its lifespan).

    Args:
        model: a preset name, a diffusers folder or a .safetensors file.
        outputs: the folder of the job database (`jobs.sqlite3`) and the images (`images/`).
        max_batch: at most this many images per `generate()` call.
        api_key: if set, every /api/v1 route needs it (`Authorization: Bearer KEY` or `?access_token=KEY`).
        start_worker: False leaves the jobs queued (`app.state.worker.start()` starts it later; for tests).
        **load: `from_preset`'s keyword arguments (`load_options`: `--dtype`, `--quantize`, `--transformer`,
            `--t5`, `--vae-tiling`, `--text-encoders-on-cpu`; for every job).

    Returns:
        A FastAPI app: the API under /api/v1, the page at / and /static.
    """
    app = FastAPI(title="keras-sd3", description="Stable Diffusion 3 with Keras 3", lifespan=lifespan)
    app.state.settings = dict(model=model, outputs=os.path.abspath(outputs), max_batch=max_batch,
                              start_worker=start_worker, load=load)
    app.state.outputs, app.state.api_key = app.state.settings["outputs"], api_key
    app.add_middleware(BodyLimit)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    return app
