"""The requests of `keras-sd3 serve`'s HTTP API: the body of POST /generate, checked completely.

Fields are checked by pydantic (`GenerateRequest`); `resolve` then checks what needs the model (the size
rule, the pictures) and turns the request into the job the store queues. Every failed check is a 422 in
FastAPI's shape, `{"detail": [{"loc": ["body", field], "msg": ..., ...}]}`, its message naming the field.
"""

import base64
import binascii
import io
import json
import re
import secrets
from typing import Annotated, Literal

from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, ImageOps
from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

MAX_STEPS = 200
MAX_IMAGES = 8
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 30
MIN_SHIFT, MAX_SHIFT = 0.01, 100.0
MAX_STEP_CACHE = 10.0  # a step-cache threshold (a relative change); keras_sd3.sampling.StepCache's default is 0.15
DEFAULT_STRENGTH = {"image-to-image": 0.8, "inpaint": 0.6}
DATA_URL = re.compile(r"^data:[^,]*;base64,")


def in_range(field, low, high, kind):
    """A pydantic after-validator: None, or a value in [low, high] (NaN is not)."""

    def check(value):
        if value is not None and not low <= value <= high:
            raise PydanticCustomError("range", "{field} must be {kind} in [{low}, {high}], got {value}",
                                      dict(field=field, kind=kind, low=low, high=high, value=value))
        return value

    return AfterValidator(check)


class GenerateRequest(BaseModel):
    """The body of POST /api/v1/generate (unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["text-to-image", "image-to-image", "inpaint"] = "text-to-image"
    prompt: StrictStr
    negative_prompt: StrictStr = ""
    num_steps: Annotated[StrictInt | None, in_range("num_steps", 1, MAX_STEPS, "an integer")] = None
    guidance_scale: Annotated[StrictFloat | None, in_range("guidance_scale", 0, MAX_GUIDANCE, "a number")] = None
    seed: Annotated[StrictInt | None, in_range("seed", 0, MAX_SEED, "an integer")] = None
    width: Annotated[StrictInt | None, in_range("width", 1, 2**16, "an integer")] = None
    height: Annotated[StrictInt | None, in_range("height", 1, 2**16, "an integer")] = None
    strength: Annotated[StrictFloat | None, in_range("strength", 0, 1, "a number")] = None
    num_images: Annotated[StrictInt, in_range("num_images", 1, MAX_IMAGES, "an integer")] = 1
    image: StrictStr | None = None
    mask: StrictStr | None = None
    keep_unmasked: StrictBool = True
    sampler: Literal["euler", "heun", "dpmpp_2m"] = "euler"
    shift: Annotated[StrictFloat | None, in_range("shift", MIN_SHIFT, MAX_SHIFT, "a number")] = None
    step_cache: Annotated[StrictFloat | None, in_range("step_cache", 0, MAX_STEP_CACHE, "a number")] = None


def invalid(field, message):
    """A 422 shaped as FastAPI's own, for a check that needs the model."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


def readable_error(error):
    """A 422 error with the field named in its message (pydantic's own messages do not name it), without
    echoing long inputs (a picture)."""
    error = dict(error)
    field = str(error["loc"][-1]) if error.get("loc") else "body"
    if error.get("type") == "extra_forbidden":
        fields = ", ".join(GenerateRequest.model_fields)
        error["msg"] = f"{field} is not a field of this request; the fields are {fields}"
    elif not error["msg"].startswith(field):
        error["msg"] = f"{field}: {error['msg']}"
    if isinstance(error.get("input"), str) and len(error["input"]) > 200:
        del error["input"]
    return error


async def validation_error(request, exc):
    """The 422 answer: FastAPI's shape, with `readable_error` messages."""
    return JSONResponse({"detail": jsonable_encoder([readable_error(e) for e in exc.errors()])}, status_code=422)


def decode_picture(text, field, mode):
    """A base64 PNG / JPEG / WebP (a `data:` URL prefix allowed) -> a PIL image in `mode` ("RGB" or "L")."""
    try:
        data = base64.b64decode("".join(DATA_URL.sub("", text, count=1).split()), validate=True)
        with Image.open(io.BytesIO(data)) as picture:
            if picture.format not in ("PNG", "JPEG", "WEBP"):
                raise ValueError(f"{picture.format} is not PNG, JPEG or WebP")
            picture.load()
            return ImageOps.exif_transpose(picture).convert(mode)
    except binascii.Error as error:
        raise invalid(field, f"{field} is not valid base64 ({error})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise invalid(field, f"{field} is not a readable PNG or JPEG picture ({error})") from None


def check_size(height, width, rule, from_image):
    """Raises a 422 unless `height` and `width` follow the model's `rule` = (multiple, max_size)."""
    multiple, limit = rule
    for field, side in (("height", height), ("width", width)):
        if side % multiple or not multiple <= side <= limit:
            allowed = f"a multiple of {multiple} in [{multiple}, {limit}]"
            if from_image:
                raise invalid("image", f"image is {width} x {height} pixels (width x height) but the model's "
                                       f"{field} must be {allowed}: give width and height")
            raise invalid(field, f"{field} must be {allowed}, got {side}")


def png_bytes(picture, size):
    """A PIL picture resized to `size` (H, W) if needed (bicubic; nearest for masks), as PNG bytes."""
    if picture.size != (size[1], size[0]):
        picture = picture.resize((size[1], size[0]), Image.BICUBIC if picture.mode == "RGB" else Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def read_pictures(body):
    """The request's image and mask as PIL pictures (None where the task takes none), checked."""
    if body.task == "text-to-image":
        return None, None
    if body.image is None:
        raise invalid("image", f"image is required for {body.task} (base64 PNG or JPEG)")
    image = decode_picture(body.image, "image", "RGB")
    if body.task != "inpaint":
        return image, None
    if body.mask is None:
        raise invalid("mask", "mask is required for inpaint (base64 PNG or JPEG, white = repaint)")
    mask = decode_picture(body.mask, "mask", "L")
    if mask.size != image.size:
        raise invalid("mask", f"mask is {mask.width} x {mask.height} pixels (width x height) but image is "
                              f"{image.width} x {image.height}: give a mask of the image's size")
    return image, mask


def resolve(body, tasks, rule):
    """The checked request -> `(parameters, batch_key, total steps, image PNG, mask PNG)` for the store."""
    from keras_sd3.tasks.image_to_image import start_step

    image, mask = read_pictures(body)
    default_height, default_width = tasks.native_size if image is None else (image.height, image.width)
    height, width = body.height or default_height, body.width or default_width
    check_size(height, width, rule, image is not None and (body.height is None or body.width is None))
    if body.seed is not None and body.seed + body.num_images - 1 > MAX_SEED:
        last = body.seed + body.num_images - 1
        raise invalid("seed", f"seed + num_images - 1 must be at most {MAX_SEED}, got {last}")
    task = tasks.get(body.task, *tasks.native_size)
    num_steps, guidance_scale, _ = task.settings(body.num_steps, body.guidance_scale, None)
    strength = None if image is None else DEFAULT_STRENGTH[body.task] if body.strength is None else body.strength
    keep_unmasked = body.keep_unmasked if body.task == "inpaint" else None
    parameters = dict(task=body.task, prompt=body.prompt, negative_prompt=body.negative_prompt, num_steps=num_steps,
                      guidance_scale=guidance_scale, seed=secrets.randbelow(2**31) if body.seed is None else body.seed,
                      width=width, height=height, strength=strength, num_images=body.num_images,
                      keep_unmasked=keep_unmasked, sampler=body.sampler, shift=body.shift, step_cache=body.step_cache)
    batch_key = json.dumps([body.task, width, height, num_steps, guidance_scale, strength, keep_unmasked,
                            body.sampler, body.shift, body.step_cache])
    total = num_steps - (0 if strength is None else start_step(num_steps, strength))
    pictures = (None if p is None else png_bytes(p, (height, width)) for p in (image, mask))
    return (parameters, batch_key, total, *pictures)
