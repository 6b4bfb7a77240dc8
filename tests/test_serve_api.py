"""The HTTP API of `keras-sd3 serve` (keras_sd3/serve) on the embedded model, through FastAPI's TestClient.

The contract is /tmp/shared_notes/serve_contract.md (kept in the README): every route, every refused input
(422 naming the field, and no job queued), 413, 401, cancellation of queued and running jobs, batching
(one `generate()` call, the same pixels as alone), and jobs that survive a restart.
"""

import base64
import io
import json
import os
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from keras_sd3 import cli, media  # noqa: E402
from keras_sd3.models import StableDiffusion3Inpaint, StableDiffusion3TextToImage  # noqa: E402
from keras_sd3.serve import create_app  # noqa: E402
from keras_sd3.serve import worker as worker_module  # noqa: E402

PROMPT = "a small red circle in the top left on a blue background"
STEPS = 2


def png64(array):
    """A uint8 array as base64 PNG text."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture(height=64, width=64):
    """A white picture with a green square."""
    array = np.full((height, width, 3), 255, np.uint8)
    array[8:40, 8:40] = (0, 160, 0)
    return array


def mask(height=64, width=64):
    """White (repaint) on the right half."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, width // 2 :] = 255
    return array


def wait(client, job_id, timeout=60.0):
    """The job once it is done, failed or cancelled."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def submit(client, **body):
    response = client.post("/api/v1/generate", json={"prompt": PROMPT, "num_steps": STEPS, **body})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def fetch(client, url):
    """A PNG of the API as (uint8 array, its text chunks)."""
    response = client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


class GenerateSpy:
    """Counts the tasks' `generate()` calls and their batch sizes."""

    def __init__(self, monkeypatch):
        self.batches = []
        for cls in (StableDiffusion3TextToImage, worker_module.StableDiffusion3ImageToImage, StableDiffusion3Inpaint):
            monkeypatch.setattr(cls, "generate", self.wrap(cls.generate))

    def wrap(self, generate):
        def spy(task, inputs, **options):
            self.batches.append(len(inputs["prompts"]))
            return generate(task, inputs, **options)

        return spy


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A server with its worker running."""
    with TestClient(create_app(outputs=tmp_path_factory.mktemp("served"))) as client:
        yield client


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """A server whose worker is not started: its jobs stay queued."""
    with TestClient(create_app(outputs=tmp_path_factory.mktemp("paused"), start_worker=False)) as client:
        yield client


def test_info_and_health(client):
    info = client.get("/api/v1/info").json()
    assert (info["model"], info["width"], info["height"], info["multiple"], info["max_size"]) == (
        "sd3_tiny_shapes", 64, 64, 8, 256)
    assert info["defaults"] == {"num_steps": 20, "guidance_scale": 4.0}
    assert (info["max_steps"], info["max_images"]) == (200, 8) and "triangle" in info["vocabulary"]
    assert "/api/v1/generate" in client.get("/openapi.json").json()["paths"]
    health = client.get("/api/v1/health").json()
    assert health == {"status": "ok", "model": "sd3_tiny_shapes", "backend": info["backend"], "queued": 0,
                      "running": 0, "worker": "alive"}


def test_text_to_image_job_writes_its_images_with_the_cli_metadata(client):
    job_id = submit(client, seed=11, num_images=2, negative_prompt="a square")
    job = wait(client, job_id)
    assert job["state"] == "done" and job["error"] is None and job["finished"] >= job["created"]
    assert job["images"] == [f"/api/v1/images/{job_id}-1.png", f"/api/v1/images/{job_id}-2.png"]
    assert job["parameters"] == {"task": "text-to-image", "prompt": PROMPT, "negative_prompt": "a square",
                                 "num_steps": STEPS, "guidance_scale": 4.0, "seed": 11, "width": 64, "height": 64,
                                 "strength": None, "num_images": 2, "keep_unmasked": None, "sampler": "euler",
                                 "shift": None, "step_cache": None}
    assert job["progress"] == {"step": STEPS, "total": STEPS} and job["position"] is None
    for index, url in enumerate(job["images"]):
        image, text = fetch(client, url)
        assert image.shape == (64, 64, 3) and image.std() > 10
        assert (text["prompt"], text["seed"], text["steps"]) == (PROMPT, str(11 + index), str(STEPS))
        assert json.loads(text["keras_sd3"])["job"] == job_id
    alone = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes").generate(
        {"prompts": PROMPT, "negative_prompts": "a square"}, num_steps=STEPS, guidance_scale=4.0, seed=12)
    assert np.abs(fetch(client, job["images"][1])[0].astype(int) - alone).max() <= 2


def test_sampler_shift_and_step_cache_give_the_api_images(client):
    """A job's sampler, shift and step-cache threshold reach `generate()`: the pixels of the direct call
    with the same settings (within 2/255), recorded in the job and the image's metadata."""
    settings = dict(sampler="dpmpp_2m", shift=2.0, step_cache=0.15)
    job = wait(client, submit(client, seed=5, num_steps=8, **settings))
    assert job["state"] == "done" and {k: job["parameters"][k] for k in settings} == settings
    image, text = fetch(client, job["images"][0])
    assert {k: json.loads(text["keras_sd3"])[k] for k in settings} == settings
    task = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes")
    alone = task.generate(PROMPT, num_steps=8, guidance_scale=4.0, seed=5, **settings)
    plain = task.generate(PROMPT, num_steps=8, guidance_scale=4.0, seed=5)
    assert np.abs(image.astype(int) - alone).max() <= 2 < np.abs(image.astype(int) - plain).max()


def test_image_tasks_and_a_size_other_than_the_native_one(client):
    image, half = png64(picture(48, 64)), png64(mask(48, 64))
    jobs = {"image-to-image": submit(client, task="image-to-image", image="data:image/png;base64," + image, seed=3),
            "inpaint": submit(client, task="inpaint", image=image, mask=half, seed=3, num_steps=4),
            "small": submit(client, width=48, height=32, seed=5)}
    done = {name: wait(client, job_id) for name, job_id in jobs.items()}
    assert all(job["state"] == "done" for job in done.values()), {k: v["error"] for k, v in done.items()}
    assert done["image-to-image"]["parameters"]["strength"] == 0.8
    assert (done["inpaint"]["parameters"]["width"], done["inpaint"]["parameters"]["height"]) == (64, 48)
    assert done["inpaint"]["progress"] == {"step": 3, "total": 3}  # strength 0.6 of 4 steps: from step 1
    inpainted = fetch(client, done["inpaint"]["images"][0])[0]
    np.testing.assert_array_equal(inpainted[:, :27], picture(48, 64)[:, :27])  # kept more than 4 px from the mask
    small, text = fetch(client, done["small"]["images"][0])
    assert small.shape == (32, 48, 3) and json.loads(text["size"]) == [32, 48]
    reference = StableDiffusion3TextToImage.from_preset("sd3_tiny_shapes", image_shape=(32, 48, 3))
    assert np.abs(small.astype(int) - reference.generate(PROMPT, num_steps=STEPS, seed=5)).max() <= 2


def test_events_stream_progress_then_the_final_job(client):
    job_id = submit(client, seed=1)
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [block.split("\n", 1) for block in text.strip().split("\n\n")]
    names = [name for name, _ in events]
    assert names[-1] == "event: done" and set(names[:-1]) == {"event: progress"}
    last = json.loads(events[-1][1].removeprefix("data: "))
    assert last["id"] == job_id and last["state"] == "done" and len(last["images"]) == 1
    progress = [json.loads(data.removeprefix("data: ")) for _, data in events[:-1]]
    assert progress[-1]["step"] <= STEPS and all(p["total"] == STEPS for p in progress)
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert "".join(response.iter_text()).startswith("event: done\n")


def test_job_list_is_newest_first_with_pagination(client):
    ids = [submit(client, seed=seed) for seed in (20, 21, 22)]
    listed = [job["id"] for job in client.get("/api/v1/jobs", params={"limit": 2}).json()["jobs"]]
    assert listed == ids[::-1][:2]
    before = client.get("/api/v1/jobs", params={"limit": 1, "before": ids[1]}).json()["jobs"]
    assert [job["id"] for job in before] == [ids[0]]
    assert client.get("/api/v1/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/api/v1/jobs", params={"limit": 101}).status_code == 422
    for job_id in ids:
        wait(client, job_id)


BAD_BODIES = [
    ({"width": 60}, "width", "multiple of 8"),
    ({"height": 264}, "height", "[8, 256]"),
    ({"strength": 1.5, "task": "image-to-image"}, "strength", "[0, 1]"),
    ({"strength": -0.1}, "strength", "[0, 1]"),
    ({"num_steps": 0}, "num_steps", "[1, 200]"),
    ({"num_steps": 201}, "num_steps", "[1, 200]"),
    ({"guidance_scale": 31}, "guidance_scale", "[0, 30"),
    ({"num_images": 9}, "num_images", "[1, 8]"),
    ({"seed": 2**32}, "seed", "4294967295"),
    ({"seed": 2**32 - 1, "num_images": 2}, "seed", "4294967295"),
    ({"task": "image-to-image", "image": base64.b64encode(b"not a picture").decode()}, "image", "PNG"),
    ({"task": "image-to-image", "image": "%%%"}, "image", "base64"),
    ({"task": "image-to-image"}, "image", "required"),
    ({"task": "inpaint", "image": png64(picture())}, "mask", "required"),
    ({"task": "inpaint", "image": png64(picture()), "mask": png64(mask(32, 64))}, "mask", "64 x 64"),
    ({"task": "image-to-image", "image": png64(picture(60, 64))}, "image", "width and height"),
    ({"task": "upscale"}, "task", "'inpaint'"),
    ({"prompt": 5}, "prompt", "string"),
    ({"num_steps": "2"}, "num_steps", "integer"),
    ({"keep_unmasked": "yes"}, "keep_unmasked", "boolean"),
    ({"scheduler": "dpm"}, "scheduler", "negative_prompt"),
    ({"sampler": "dpm"}, "sampler", "'dpmpp_2m'"),
    ({"shift": 0}, "shift", "[0.01, 100"),
    ({"step_cache": -0.1}, "step_cache", "[0, 10"),
]


@pytest.mark.parametrize("body, field, words", BAD_BODIES, ids=[f for _, f, _ in BAD_BODIES])
def test_bad_inputs_are_422_naming_the_field_and_never_reach_the_model(client, monkeypatch, body, field, words):
    spy, before = GenerateSpy(monkeypatch), client.get("/api/v1/jobs", params={"limit": 100}).json()["jobs"]
    response = client.post("/api/v1/generate", json={"prompt": PROMPT, **body})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field] and field in error["msg"] and words in error["msg"], error
    time.sleep(0.1)
    assert client.get("/api/v1/jobs", params={"limit": 100}).json()["jobs"] == before and spy.batches == []


def test_request_body_above_32_mib_is_413(client):
    big = json.dumps({"prompt": PROMPT, "image": "A" * (32 * 2**20)})
    assert client.post("/api/v1/generate", content=big, headers={"content-type": "application/json"}).status_code == 413
    chunks = (b"A" * 2**20 for _ in range(33))  # no Content-Length: counted as it arrives
    response = client.post("/api/v1/generate", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "32 MiB" in response.json()["detail"]


def test_unknown_job_is_404(client):
    for method, path in [("GET", "/api/v1/jobs/nope"), ("GET", "/api/v1/jobs/nope/events"),
                         ("DELETE", "/api/v1/jobs/nope"), ("GET", "/api/v1/jobs?before=nope")]:
        response = client.request(method, path)
        assert response.status_code == 404 and response.json() == {"detail": "no job nope"}, (method, path)


@pytest.mark.parametrize("name", ["..%2Fjobs.sqlite3", "..%2Fsecret.png", "../x.png", "/etc/passwd", "a/b.png",
                                  "..%5Csecret.png", "jobs.sqlite3", "missing.png"])
def test_image_names_outside_the_images_folder_are_404(client, name):
    outputs = client.app.state.outputs
    with open(os.path.join(outputs, "secret.png"), "wb") as file:
        file.write(b"the content of secret.png")
    response = client.get(f"/api/v1/images/{name}")
    assert response.status_code == 404 and b"the content" not in response.content


def test_api_key(tmp_path):
    with TestClient(create_app(outputs=tmp_path, api_key="k3y", start_worker=False)) as client:
        assert client.get("/api/v1/health").status_code == 401
        assert client.get("/api/v1/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/v1/info", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert client.get("/api/v1/jobs?access_token=k3y").status_code == 200
        assert client.post("/api/v1/generate", json={"prompt": PROMPT}).status_code == 401
        assert client.get("/").status_code == 200 and "html" in client.get("/").headers["content-type"]


def test_cancel_a_queued_job_and_positions(paused):
    first, second = submit(paused), submit(paused)
    assert paused.get(f"/api/v1/jobs/{second}").json()["position"] == 1 + paused.get(
        f"/api/v1/jobs/{first}").json()["position"]
    job = paused.delete(f"/api/v1/jobs/{first}").json()
    assert job["state"] == "cancelled" and job["finished"] is not None
    assert paused.get(f"/api/v1/jobs/{second}").json()["position"] == 0
    response = paused.delete(f"/api/v1/jobs/{first}")
    assert response.status_code == 409 and response.json() == {"detail": f"job {first} is already cancelled"}
    assert paused.get("/api/v1/health").json()["worker"] == "dead"
    paused.delete(f"/api/v1/jobs/{second}")


def test_cancel_a_running_job(client, monkeypatch):
    worker, started = client.app.state.worker, []
    callback = worker.callback

    def slow(ids, start):
        on_step = callback(ids, start)

        def step(*args):
            started.append(args[0])
            time.sleep(0.2)
            on_step(*args)

        return step

    monkeypatch.setattr(worker, "callback", slow)
    job_id = submit(client, num_steps=100)
    deadline = time.monotonic() + 30
    while not started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "running"
    assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 200
    job = wait(client, job_id, timeout=10)
    assert job["state"] == "cancelled" and job["images"] == [] and len(started) < 20
    assert not [n for n in os.listdir(os.path.join(client.app.state.outputs, "images")) if n.startswith(job_id)]
    response = client.delete(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 409


def test_cancel_one_job_of_a_running_batch(tmp_path, monkeypatch):
    spy, cancelled = GenerateSpy(monkeypatch), []
    with TestClient(create_app(outputs=tmp_path, start_worker=False)) as client:
        worker = client.app.state.worker
        callback = worker.callback

        def slow(ids, start):
            on_step = callback(ids, start)
            return lambda *args: (time.sleep(0 if cancelled else 0.1), on_step(*args))

        monkeypatch.setattr(worker, "callback", slow)
        ids = [submit(client, num_steps=30, seed=seed) for seed in (1, 2)]
        worker.start()
        deadline = time.monotonic() + 30
        while client.get(f"/api/v1/jobs/{ids[0]}").json()["progress"]["step"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelled.append(client.delete(f"/api/v1/jobs/{ids[0]}").json())
        first, second = wait(client, ids[0]), wait(client, ids[1])
        assert cancelled[0]["state"] == "running" and spy.batches == [2]
        assert first["state"] == "cancelled" and first["images"] == [] and first["progress"]["step"] < 30
        assert second["state"] == "done" and second["progress"]["step"] == 30 and len(second["images"]) == 1
        assert os.listdir(os.path.join(tmp_path, "images")) == [f"{ids[1]}-1.png"]


def test_compatible_jobs_run_as_one_generate_call_with_the_pixels_of_each_alone(client, tmp_path, monkeypatch):
    bodies = [dict(seed=31, num_images=2), dict(seed=40, negative_prompt="a green square",
                                                  prompt="a big yellow triangle on a black background")]
    alone = [wait(client, submit(client, **body)) for body in bodies]
    spy = GenerateSpy(monkeypatch)
    with TestClient(create_app(outputs=tmp_path, start_worker=False)) as paused:
        ids = [submit(paused, **body) for body in bodies]
        paused.app.state.worker.start()
        batched = [wait(paused, job_id) for job_id in ids]
        assert spy.batches == [3] and paused.app.state.worker.batches == 1
        for one, other in zip(alone, batched):
            assert other["state"] == "done" and len(other["images"]) == len(one["images"])
            for url, reference in zip(other["images"], one["images"]):
                image, text = fetch(paused, url)
                assert np.abs(image.astype(int) - fetch(client, reference)[0]).max() <= 2
                path = os.path.join(tmp_path, "images", os.path.basename(url))
                assert media.read_metadata(path)["seed"] == int(text["seed"])
        assert json.loads(fetch(paused, batched[0]["images"][1])[1]["seed"]) == 32


def test_jobs_survive_a_restart(tmp_path):
    image = png64(picture())
    with TestClient(create_app(outputs=tmp_path, start_worker=False)) as first:
        ids = [submit(first, seed=1), submit(first, seed=2, width=32),
               submit(first, task="image-to-image", image=image, strength=0.5, num_steps=4)]
        running = first.app.state.store.next_batch(1)  # as if the server were killed during this batch
        assert [job["id"] for job in running] == ids[:1]
    with TestClient(create_app(outputs=tmp_path)) as second:
        jobs = [wait(second, job_id) for job_id in ids]
        assert [job["state"] for job in jobs] == ["done"] * 3, jobs
        assert jobs[2]["parameters"]["strength"] == 0.5 and jobs[2]["progress"] == {"step": 2, "total": 2}
        images = [fetch(second, job["images"][0])[0] for job in jobs]
        assert [i.shape for i in images] == [(64, 64, 3), (64, 32, 3), (64, 64, 3)]
    with TestClient(create_app(outputs=tmp_path, start_worker=False)) as third:
        listed = third.get("/api/v1/jobs").json()["jobs"]
        assert [job["id"] for job in listed] == ids[::-1] and {job["state"] for job in listed} == {"done"}
        assert third.get(listed[0]["images"][0]).status_code == 200


def test_cli_serve_starts_uvicorn_with_the_app_and_warns_on_a_public_address(tmp_path, monkeypatch, capsys):
    started = {}
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, host, port: started.update(app=app, host=host, port=port))
    monkeypatch.delenv("KERAS_SD3_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "8123", "--outputs", str(tmp_path / "out")]) == 0
    assert (started["host"], started["port"]) == ("0.0.0.0", 8123)
    assert started["app"].state.settings["outputs"] == str(tmp_path / "out")
    assert "keras-sd3: warning: serving on 0.0.0.0, not only on this machine: anyone who can reach" in \
        capsys.readouterr().err
    assert cli.main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--outputs", str(tmp_path / "out")]) == 0
    assert "serving on 0.0.0.0, not only on this machine: API calls need the key" in capsys.readouterr().err
    assert cli.main(["serve", "--outputs", str(tmp_path / "out")]) == 0
    assert started["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    assert started["app"].state.settings["load"]["vae_tiling"] is None
    assert cli.main(["serve", "--vae-tiling", "--outputs", str(tmp_path / "out")]) == 0
    assert started["app"].state.settings["load"]["vae_tiling"] == 512  # (every job's task is loaded with it)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--max-batch", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "keras-sd3: error: --max-batch must be an integer >= 1, got '0'\n"
    assert cli.main(["serve", "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("keras-sd3: error: ")
