"""Trains the embedded `sd3_tiny_shapes` preset from scratch (see keras_sd3/training/tiny_shapes.py).

The shipped weights are two stages (times on this project's 2-core CPU, torch backend):

    python scripts/train_tiny_shapes.py --output /tmp/stage1                       # VAE + MMDiT, ~42 min
    python scripts/train_tiny_shapes.py --resume /tmp/stage1 --vae-steps 0 --seed 1 \
        --learning-rate 5e-4 --output keras_sd3/embedded/sd3_tiny_shapes             # MMDiT again, ~30 min
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
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--resume", default=None, help="continue from a folder written by an earlier run")
    args = parser.parse_args()
    tiny_shapes.build(args.output, args.num_images, args.vae_steps, args.mmdit_steps, args.batch_size,
                      args.num_layers, args.seed, resume=args.resume, learning_rate=args.learning_rate)
