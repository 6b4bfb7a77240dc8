"""`keras-sd3 walk`: a latent walk (`keras_sd3.explore`) written as an animation.

    keras-sd3 walk "a red circle on a blue background" --frames 16 -o walk.gif            # a seamless loop
    keras-sd3 walk "a red circle" --to "a blue square" --frames 24 -o morph.mp4           # prompt to prompt
    keras-sd3 walk "a red circle" --kind around --step-size 0.02 --frames 16 -o away.gif  # away from a prompt
"""

import secrets

from keras_sd3 import media
from keras_sd3.cli.arguments import MAX_SEED, add_mesh_argument, add_model_arguments, load_options, number, parse_size
from keras_sd3.cli.generate import use_mesh
from keras_sd3.errors import UsageError

KINDS = ("circular", "interpolate", "around")
EXTENSIONS = (".gif", ".mp4", ".webm", ".mov", ".png")


def add_walk_parser(commands):
    command = commands.add_parser("walk", help="latent walk as an animation", description="A walk through "
                                  "latent space (keras_sd3.explore) written as a .gif, a video or a .png contact sheet.")
    command.add_argument("prompt")
    command.add_argument("--to", help="the prompt to walk to (--kind interpolate, the default when given)")
    command.add_argument("--kind", choices=KINDS, help="circular: one prompt, a loop in noise space; interpolate: "
                         "from the prompt to --to; around: a straight walk away from the prompt (default: "
                         "interpolate with --to, else circular)")
    command.add_argument("--frames", type=number(int, 2), default=16, help="(default: %(default)s)")
    command.add_argument("--step-size", type=number(float, 0.0, what="a number >= 0"), default=0.01,
                         help="--kind around: distance per frame (default: %(default)s)")
    command.add_argument("--fps", type=number(int, 1), default=10, help="(default: %(default)s)")
    add_model_arguments(command)
    command.add_argument("--steps", type=number(int, 1), help="denoising steps (default: the model's)")
    command.add_argument("--guidance", type=number(float, 0.0, what="a number >= 0"),
                         help="guidance scale (default: the model's)")
    command.add_argument("--negative", default="", help="negative prompt (default: none)")
    command.add_argument("--seed", type=number(int, 0, MAX_SEED), help="noise seed (default: random)")
    command.add_argument("--size", type=parse_size, help="N or HxW pixels (default: the model's)")
    command.add_argument("--batch-size", type=number(int, 1), help="frames per compiled call (default: 4, a "
                         "multiple of the mesh's B)")
    add_mesh_argument(command)
    command.add_argument("-o", "--output", default="walk.gif", help=f"{', '.join(EXTENSIONS)} (default: %(default)s)")
    command.add_argument("-v", "--verbose", action="store_true", help="show the backends' log messages")


def check_walk(args):
    """The walk's kind, after checking the arguments that need no model."""
    kind = args.kind or ("interpolate" if args.to is not None else "circular")
    if (kind == "interpolate") != (args.to is not None):
        raise UsageError("--to goes with --kind interpolate (and it needs --to)")
    if not args.output.lower().endswith(EXTENSIONS):
        raise UsageError(f"-o/--output must end in {', '.join(EXTENSIONS)}, got {args.output!r}")
    return kind


def walk(args, kind):
    """Loads the model, makes the frames and writes them to `args.output` (its folder exists)."""
    from keras_sd3 import explore, models

    use_mesh(args.mesh)
    image_shape = None if args.size is None else (*args.size, 3)
    task = models.StableDiffusion3TextToImage.from_preset(args.model, image_shape=image_shape, **load_options(args))
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed
    options = dict(num_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size, progress=True,
                   negative_prompt=args.negative, seed=seed)
    if kind == "circular":
        frames = explore.circular_walk(task, args.prompt, args.frames, **options)
    elif kind == "interpolate":
        frames = explore.interpolate_prompts(task, args.prompt, args.to, args.frames, **options)
    else:
        frames = explore.walk_around_prompt(task, args.prompt, args.frames, step_size=args.step_size, **options)
    media.save_frames(args.output, frames, fps=args.fps, metadata={"prompt": args.prompt, "kind": kind, "seed": seed,
                                                                   "model": args.model})
    print(args.output)
