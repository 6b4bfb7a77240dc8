"""Trains the embedded `sd3_tiny_shapes` preset from scratch (see keras_sd3/training/tiny_shapes.py).

    KERAS_BACKEND=torch python scripts/train_tiny_shapes.py --output keras_sd3/embedded/sd3_tiny_shapes

About 35 minutes on a 2-core CPU with the defaults (torch backend; jax works too).
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from keras_sd3.training import tiny_shapes  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="keras_sd3/embedded/sd3_tiny_shapes")
    parser.add_argument("--num-images", type=int, default=8000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--mmdit-steps", type=int, default=3500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tiny_shapes.build(args.output, args.num_images, args.vae_steps, args.mmdit_steps, args.batch_size,
                      args.num_layers, args.seed)
