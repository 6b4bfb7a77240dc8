"""The server's worker thread: takes batches of compatible jobs from the `JobStore`, runs each batch as one
`generate()` call, writes the images, marks the jobs done.

A job gives the same images batched or alone: image k of a job starts from `task.noise(1, seed + k - 1)`,
as in `keras-sd3 generate --num-images`.
"""

import io
import os
import threading

import numpy as np
from PIL import Image

from keras_sd3 import backend_name, media
from keras_sd3.models import StableDiffusion3ImageToImage, StableDiffusion3Inpaint, StableDiffusion3TextToImage
from keras_sd3.tasks.image_to_image import start_step
from keras_sd3.tasks.task import picture_array

TASK_CLASSES = {"text-to-image": StableDiffusion3TextToImage, "image-to-image": StableDiffusion3ImageToImage,
                "inpaint": StableDiffusion3Inpaint}


class ResizedBackbone:
    """A backbone seen as making images of another size: the same object (weights, text encoders, step
    methods) with another `image_shape` and `latent_shape`. The step methods take the size from their
    inputs (the MMDiT crops its position table to it), so no second copy of the weights is needed.

    Args:
        backbone: a `StableDiffusion3Backbone`.
        image_shape: `(height, width, 3)`, already checked against `image_size_rule`.
    """

    def __init__(self, backbone, image_shape):
        self.backbone, self.image_shape = backbone, tuple(image_shape)

    @property
    def latent_shape(self):
        factor, channels = self.backbone.vae_config.downsample_factor, self.backbone.vae_config.latent_channels
        return (self.image_shape[0] // factor, self.image_shape[1] // factor, channels)

    def __getattr__(self, name):
        return getattr(self.backbone, name)


class TaskCache:
    """The three generation tasks of one model, for every image size asked for, on one backbone.

    The model is loaded once (at the native size); a task of another size uses the same backbone through
    `ResizedBackbone`, and all tasks share one set of compiled programs (jax / tensorflow compile once per
    input shape, as they would anyway).

    Args:
        model: a preset name, a diffusers folder or a .safetensors file.
        **load: `from_preset`'s keyword arguments (`dtype`, `quantize`, `transformer`, `t5`, `vae_tiling`).
    """

    def __init__(self, model, **load):
        self.model = model
        base = StableDiffusion3TextToImage.from_preset(model, **load)
        self.backbone, self.preprocessor, self.defaults = base.backbone, base.preprocessor, base.defaults
        self.native_size = tuple(self.backbone.image_shape[:2])
        self._tasks = {("text-to-image", *self.native_size): base}
        self._lock = threading.Lock()

    def get(self, name, height, width):
        """The task `name` ("text-to-image", "image-to-image" or "inpaint") making `height` x `width` images."""
        key = (name, height, width)
        with self._lock:
            if key not in self._tasks:
                shared = self._tasks[("text-to-image", *self.native_size)]
                backbone = self.backbone if (height, width) == self.native_size else ResizedBackbone(
                    self.backbone, (height, width, 3))
                task = TASK_CLASSES[name](backbone, self.preprocessor, self.defaults)
                task.compiled = shared.compiled
                self._tasks[key] = task
            return self._tasks[key]


class BatchCancelled(Exception):
    """Raised from the step callback when every job of the batch was cancelled."""


class Stopping(Exception):
    """Raised from the step callback when the server stops; the batch runs again at the next start."""


def read_png(data, mode):
    """PNG bytes -> float32 RGB in [-1, 1] (`mode` "RGB") or a {0, 1} mask ("L": white = repaint)."""
    with Image.open(io.BytesIO(data)) as picture:
        return picture_array(picture, mode)


def sampling_options(parameters):
    """A job's `sampler`, `shift` and `step_cache` (a threshold) for `generate()`; jobs queued by an
    older server have none: Euler, SD3's shift, no cache."""
    return {key: parameters.get(key, default) for key, default in (("sampler", "euler"), ("shift", None),
                                                                      ("step_cache", None))}


def batch_inputs(task, jobs):
    """The flat `generate()` inputs of a batch: each job's prompt, negative prompt, pictures and noise
    (`task.noise(1, seed + k)`) repeated for its `num_images`. Returns (inputs, noise)."""
    prompts, negatives, noise, images, masks = [], [], [], [], []
    for job in jobs:
        parameters, count = job["parameters"], job["parameters"]["num_images"]
        prompts += [parameters["prompt"]] * count
        negatives += [parameters["negative_prompt"]] * count
        noise += [task.noise(1, parameters["seed"] + k) for k in range(count)]
        if job["image"] is not None:
            images += [read_png(job["image"], "RGB")] * count
        if job["mask"] is not None:
            masks += [read_png(job["mask"], "L")] * count
    inputs = {"prompts": prompts, "negative_prompts": negatives}
    if images:
        inputs["images"] = np.stack(images)
    if masks:
        inputs["masks"] = np.stack(masks)
    return inputs, np.concatenate(noise)


class Worker(threading.Thread):
    """A daemon thread that runs the queued jobs of `store`, a batch at a time.

    Args:
        store: the `JobStore`.
        tasks: the `TaskCache` of the model.
        outputs: the outputs folder; images are written to `outputs/images/<job id>-<k>.png`.
        max_batch: at most this many images per `generate()` call (a job asking for more runs alone).
    """

    def __init__(self, store, tasks, outputs, max_batch=4):
        super().__init__(name="keras-sd3-worker", daemon=True)
        self.store, self.tasks, self.max_batch = store, tasks, max_batch
        self.images = os.path.join(outputs, "images")
        self.batches = 0
        self._stop_event = threading.Event()

    def stop(self, timeout=30.0):
        """Asks the thread to stop (a running batch stops at its next step) and waits for it."""
        self._stop_event.set()
        self.store.wakeup.set()
        if self.is_alive():
            self.join(timeout)

    def run(self):
        os.makedirs(self.images, exist_ok=True)
        while not self._stop_event.is_set():
            self.store.wakeup.clear()
            jobs = self.store.next_batch(self.max_batch)
            if jobs:
                self.run_batch(jobs)
            else:
                self.store.wakeup.wait(0.5)

    def run_batch(self, jobs):
        """Generates a batch and saves its images; every exception ends the batch's jobs failed."""
        ids = [job["id"] for job in jobs]
        self.batches += 1
        try:
            images = self.generate(jobs)
            cancelled = self.store.settle_cancelled(ids)
            for job, job_images in zip(jobs, images):
                if job["id"] not in cancelled:
                    self.save(job, job_images)
        except (BatchCancelled, Stopping):
            pass
        except Exception as error:  # the worker keeps serving; the jobs say what went wrong
            self.store.fail(ids, f"{type(error).__name__}: {error}")

    def generate(self, jobs):
        """One `generate()` call for the whole batch -> a list of uint8 (num_images, H, W, 3) per job."""
        parameters = jobs[0]["parameters"]
        name, height, width = parameters["task"], parameters["height"], parameters["width"]
        task = self.tasks.get(name, height, width)
        inputs, noise = batch_inputs(task, jobs)
        start = 0 if name == "text-to-image" else start_step(parameters["num_steps"], parameters["strength"])
        options = dict(num_steps=parameters["num_steps"], guidance_scale=parameters["guidance_scale"], num_images=1,
                       callback=self.callback([job["id"] for job in jobs], start), **sampling_options(parameters))
        if name == "text-to-image":
            options["latents"] = noise
        else:
            options.update(noise=noise, strength=parameters["strength"])
        if name == "inpaint":
            options["keep_unmasked"] = parameters["keep_unmasked"]
        outputs = np.asarray(task.generate(inputs, **options)).reshape((-1, height, width, 3))
        bounds = np.cumsum([job["parameters"]["num_images"] for job in jobs])[:-1]
        return np.split(outputs, bounds)

    def callback(self, ids, start):
        """The step callback: records progress, ends the jobs whose cancellation was asked for, and stops
        the batch when all of them are cancelled or the server stops."""

        def on_step(step, num_steps, latents):
            self.store.progress(ids, step + 1 - start, num_steps - start)
            if self._stop_event.is_set():
                raise Stopping()
            if self.store.settle_cancelled(ids) == set(ids):
                raise BatchCancelled()

        return on_step

    def save(self, job, images):
        """Writes a job's images (atomically, with the CLI's metadata), then marks it done."""
        parameters = job["parameters"]
        metadata = {"prompt": parameters["prompt"], "negative_prompt": parameters["negative_prompt"],
                    "steps": parameters["num_steps"], "guidance": parameters["guidance_scale"],
                    "model": self.tasks.model, "task": parameters["task"], "backend": backend_name(),
                    "size": [parameters["height"], parameters["width"]], "job": job["id"]}
        metadata.update({k: v for k, v in sampling_options(parameters).items() if v is not None})
        if parameters["task"] != "text-to-image":
            metadata["strength"] = parameters["strength"]
        if parameters["task"] == "inpaint":
            metadata["keep_unmasked"] = parameters["keep_unmasked"]
        names = []
        for index, image in enumerate(images):
            names.append(f"{job['id']}-{index + 1}.png")
            extra = {"seed": parameters["seed"] + index, "image_index": index}
            media.save_image(os.path.join(self.images, names[-1]), image, {**metadata, **extra})
        self.store.finish(job["id"], names)
