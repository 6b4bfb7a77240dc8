"""`keras-sd3 serve`: checks its arguments, then runs the app under uvicorn (the options are in `keras_sd3.cli`)."""

import os
import sys

from keras_sd3.cli.arguments import add_model_arguments, load_options, number
from keras_sd3.errors import UsageError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(commands):
    """`keras-sd3 serve`: its own options (no prompt, no output file)."""
    command = commands.add_parser("serve", help="HTTP server and web page", description="Serves the model over "
                                  "HTTP (an API under /api/v1 and a web page at /) with a persistent job queue.")
    add_model_arguments(command)
    command.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    command.add_argument("--port", type=number(int, 1, 65535), default=7860, help="(default: %(default)s)")
    command.add_argument("--outputs", default="outputs", help="folder of the job database and the images "
                         "(default: %(default)s)")
    command.add_argument("--max-batch", type=number(int, 1), default=4, help="at most this many images per "
                         "model call (default: %(default)s)")
    command.add_argument("--api-key", default=os.environ.get("KERAS_SD3_API_KEY") or None,
                         help="require this key on the API (default: $KERAS_SD3_API_KEY, else none)")
    command.add_argument("-v", "--verbose", action="store_true", help="show the backends' log messages")


def serve(args):
    """Checks the model source and the outputs folder, then runs the server until Ctrl-C."""
    try:
        import uvicorn

        from keras_sd3.serve.app import create_app
    except ImportError as error:
        raise UsageError(f"serve needs fastapi and uvicorn ({error}): pip install 'keras_sd3[serve]'") from None
    from keras_sd3.weights.checkpoint import open_checkpoint

    open_checkpoint(args.model, transformer=args.transformer, t5=args.t5)
    os.makedirs(args.outputs, exist_ok=True)
    if not os.access(args.outputs, os.W_OK):
        raise UsageError(f"cannot write to the outputs folder {args.outputs!r}")
    if args.host not in LOCAL_HOSTS:
        who = "API calls need the key" if args.api_key else "anyone who can reach this machine can use it (set --api-key)"
        print(f"keras-sd3: warning: serving on {args.host}, not only on this machine: {who}", file=sys.stderr)
    app = create_app(args.model, args.outputs, args.max_batch, args.api_key, **load_options(args))
    uvicorn.run(app, host=args.host, port=args.port)
