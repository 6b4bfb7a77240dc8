"""Generation tasks: text-to-image, image-to-image and inpainting, built on the backbone's steps."""

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported

from keras_sd3.tasks.controlnet import StableDiffusion3ControlNet
from keras_sd3.tasks.image_to_image import StableDiffusion3ImageToImage
from keras_sd3.tasks.inpaint import StableDiffusion3Inpaint
from keras_sd3.tasks.text_to_image import StableDiffusion3TextToImage
