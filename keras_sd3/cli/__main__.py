"""`python -m keras_sd3.cli ...` = `keras-sd3 ...`."""

import sys

from keras_sd3.cli import main

sys.exit(main())
