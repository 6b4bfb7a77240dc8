"""`keras-sd3 generate / img2img / inpaint / control`: checks that need no model, then the run."""

import os
import secrets
import sys
import warnings

from keras_sd3 import media
from keras_sd3.errors import UsageError
from keras_sd3.cli.arguments import MAX_SEED, load_options


def picture_size(path, option):
    """(height, width) of a readable picture file, else a UsageError naming `option`."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            picture.load()
            return picture.height, picture.width
    except FileNotFoundError:
        raise UsageError(f"{option} {path!r} does not exist") from None
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path!r} is not a readable image ({error})") from None


def output_paths(output, count):
    """The files to write: `output`, or `stem-1.ext`, `stem-2.ext`, ... for several images."""
    extension = os.path.splitext(output)[1].lower()
    if extension not in media.IMAGE_EXTENSIONS:
        raise UsageError(f"-o/--output must end in {', '.join(media.IMAGE_EXTENSIONS)}, got {output!r}")
    if count == 1:
        return [output]
    stem = output[: -len(extension)]
    return [f"{stem}-{i + 1}{output[-len(extension):]}" for i in range(count)]


def make_folders(paths):
    """Creates the output folder if missing; returns the folders created (to remove after a failure)."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in paths:
        if os.path.isdir(path):
            raise UsageError(f"-o/--output {path!r} is a folder; give a file name")
    try:
        for created in reversed(missing):
            os.mkdir(created)
    except OSError as error:
        raise UsageError(f"cannot create the output folder {error.filename!r} ({error.strerror})") from None
    if not os.access(os.path.dirname(os.path.abspath(paths[0])), os.W_OK):
        raise UsageError(f"cannot write to the output folder of {paths[0]!r}")
    return missing


def check_arguments(args):
    """Checks files, output and seed (no model needed); returns the output paths."""
    if args.seed is not None and args.seed + args.num_images - 1 > MAX_SEED:
        raise UsageError(f"--seed + --num-images - 1 must be at most {MAX_SEED}, got {args.seed + args.num_images - 1}")
    for path, _ in args.lora:
        if not os.path.isfile(path) or not path.lower().endswith(".safetensors"):
            raise UsageError(f"--lora {path!r} is not a .safetensors file")
    for path, _ in getattr(args, "controlnet", []):
        if not os.path.exists(path):
            raise UsageError(f"--controlnet {path!r} does not exist")
    args.image_option, args.image_size = None, None
    if args.command == "control":
        if len(args.control_image) != len(args.controlnet):
            raise UsageError(f"got {len(args.controlnet)} --controlnet but {len(args.control_image)} --control-image; "
                             "give one control image per ControlNet")
        if args.control_start >= args.control_end:
            raise UsageError(f"--control-start {args.control_start} must be below --control-end {args.control_end}")
        sizes = [picture_size(path, "--control-image") for path in args.control_image]
        args.image_option, args.image_size = ("--control-image", args.control_image[0]), sizes[0]
    elif args.command != "generate":
        args.image_option, args.image_size = ("--image", args.image), picture_size(args.image, "--image")
    if args.command == "inpaint":
        mask_size = picture_size(args.mask, "--mask")
        target = args.size or args.image_size
        if mask_size != target:
            print(f"keras-sd3: note: the mask is {mask_size[1]} x {mask_size[0]} pixels; resized to the image's "
                  f"{target[1]} x {target[0]}", file=sys.stderr)
    return output_paths(args.output, args.num_images)


def check_size(args):
    """The image size (the argument, the input picture's or None for the model's), checked against
    the model's configuration before any weight is read."""
    from keras_sd3.models.backbone import image_size_rule
    from keras_sd3.weights.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(args.model)
    multiple, limit = image_size_rule(checkpoint.mmdit.config, checkpoint.vae.config)
    size = args.size or args.image_size
    if size is not None and any(side % multiple or side > limit for side in size):
        rule = f"{args.model} makes images whose height and width are multiples of {multiple} up to {limit}"
        if args.size:
            raise UsageError(f"--size {size[0]}x{size[1]}: {rule}")
        option, path = args.image_option
        raise UsageError(f"{option} {path!r} is {size[0]}x{size[1]} pixels and {rule}: pass --size")
    return size


def read_picture(path, size, mode):
    """A picture as a float array: RGB in [-1, 1] or a mask in {0, 1}, resized to `size` (H, W) if needed."""
    from PIL import Image

    from keras_sd3.tasks.task import picture_array

    with Image.open(path) as picture:
        picture = picture.convert(mode)
        if picture.size != (size[1], size[0]):
            picture = picture.resize((size[1], size[0]), Image.BICUBIC if mode == "RGB" else Image.NEAREST)
        return picture_array(picture, mode)


def use_mesh(text):
    """Sets Keras' distribution for `--mesh` (before the model is built)."""
    if text is not None:
        from keras_sd3.distribution import set_mesh

        set_mesh(text)


def load_task(args, size):
    """The command's task, with its LoRAs loaded."""
    from keras_sd3 import models

    image_shape = None if size is None else (*size, 3)
    if args.command == "control":
        nets = [path for path, _ in args.controlnet]
        task = models.StableDiffusion3ControlNet.from_preset(args.model, nets, image_shape=image_shape,
                                                             **load_options(args))
    else:
        task_class = {"generate": models.StableDiffusion3TextToImage, "img2img": models.StableDiffusion3ImageToImage,
                      "inpaint": models.StableDiffusion3Inpaint}[args.command]
        task = task_class.from_preset(args.model, image_shape=image_shape, **load_options(args))
    for index, (path, scale) in enumerate(args.lora):
        task.backbone.load_lora(path, scale=scale, name=f"{index + 1}-{os.path.basename(path)}")
    return task


def generate(args, size, paths):
    """Loads the model, generates `--num-images` images (seeds seed, seed + 1, ...) and writes them."""
    import numpy as np

    from keras_sd3 import backend_name
    task = load_task(args, size)
    unknown = task.preprocessor.unknown_words(args.prompt) if task.preprocessor else []
    if unknown:
        warnings.warn(f"{args.model} was trained on captions made of {len(task.preprocessor.vocabulary)} words "
                      f"only; it does not know {', '.join(map(repr, unknown))} (see the README)")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    noise = np.concatenate([task.noise(1, seed + i) for i in range(args.num_images)])
    num_steps, guidance, _ = task.settings(args.steps, args.guidance, None)
    options = dict(num_steps=num_steps, guidance_scale=guidance, progress=True, num_images=args.num_images)
    inputs = {"prompts": args.prompt, "negative_prompts": args.negative}
    metadata = {"prompt": args.prompt, "negative_prompt": args.negative, "steps": num_steps, "guidance": guidance,
                "model": args.model, "task": args.command, "backend": backend_name()}
    if args.lora:
        metadata["loras"] = [list(lora) for lora in args.lora]
    if args.command != "control":
        from keras_sd3.sampling import StepCache

        step_cache = StepCache() if args.cache is True else args.cache
        options.update(sampler=args.sampler, shift=args.shift, step_cache=step_cache)
        metadata["sampler"] = args.sampler
        if step_cache is not None:
            metadata["step_cache"] = getattr(step_cache, "threshold", step_cache)
        if args.shift is not None:
            metadata["shift"] = args.shift
    if args.command in ("generate", "control"):
        options["latents"] = noise
    if args.command == "control":
        size = task.backbone.image_shape[:2]
        inputs["control_images"] = [read_picture(path, size, "RGB") for path in args.control_image]
        options.update(controlnet_conditioning_scale=[scale for _, scale in args.controlnet],
                       control_guidance_start=args.control_start, control_guidance_end=args.control_end)
        metadata.update(controlnets=[list(net) for net in args.controlnet], control_images=args.control_image,
                        control_start=args.control_start, control_end=args.control_end)
    elif args.command != "generate":
        size = task.backbone.image_shape[:2]
        inputs["images"] = read_picture(args.image, size, "RGB")
        options.update(noise=noise, strength=args.strength)
        metadata["strength"] = args.strength
    if args.command == "inpaint":
        inputs["masks"] = read_picture(args.mask, size, "L")
        options["keep_unmasked"] = metadata["keep_unmasked"] = args.keep_unmasked
    images = np.asarray(task.generate(inputs, **options)).reshape((-1, *task.backbone.image_shape))
    metadata["size"] = list(images.shape[1:3])
    for index, (path, image) in enumerate(zip(paths, images)):
        extra = {"seed": seed + index, **({"image_index": index} if len(paths) > 1 else {})}
        media.save_image(path, image, {**metadata, **extra})
        print(path)
