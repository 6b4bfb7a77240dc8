"""`keras-sd3 serve`: an HTTP server (FastAPI) with a persistent job queue and a web page.

    from keras_sd3.serve import create_app
    app = create_app(model="sd3_tiny_shapes", outputs="outputs")   # then: uvicorn.run(app)

`store.JobStore` keeps the jobs in SQLite, `worker.Worker` runs them in batches on one model,
`app.create_app` is the API (/api/v1) and the page (static/). Needs `pip install keras_sd3[serve]`.
"""

__all__ = ["create_app"]


def __getattr__(name):
    """`create_app` is imported on first use, so that `keras-sd3 serve` can say when fastapi is missing."""
    if name == "create_app":
        from keras_sd3.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'keras_sd3.serve' has no attribute {name!r}")
