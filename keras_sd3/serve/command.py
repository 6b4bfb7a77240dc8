"""`keras-sd3 serve`: checks its arguments, then runs the app under uvicorn (the options are in `keras_sd3.cli`)."""

import os
import sys

from keras_sd3.errors import UsageError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def serve(args):
    """Checks the model source and the outputs folder, then runs the server until Ctrl-C."""
    try:
        import uvicorn

        from keras_sd3.serve.app import create_app
    except ImportError as error:
        raise UsageError(f"serve needs fastapi and uvicorn ({error}): pip install 'keras_sd3[serve]'") from None
    from keras_sd3.weights.checkpoint import open_checkpoint

    open_checkpoint(args.model)
    os.makedirs(args.outputs, exist_ok=True)
    if not os.access(args.outputs, os.W_OK):
        raise UsageError(f"cannot write to the outputs folder {args.outputs!r}")
    if args.host not in LOCAL_HOSTS:
        who = "API calls need the key" if args.api_key else "anyone who can reach this machine can use it (set --api-key)"
        print(f"keras-sd3: warning: serving on {args.host}, not only on this machine: {who}", file=sys.stderr)
    app = create_app(args.model, args.outputs, args.max_batch, args.api_key, dtype=args.dtype)
    uvicorn.run(app, host=args.host, port=args.port)
