"""Models: the MMDiT, the VAE and the `StableDiffusion3Backbone` that ties them to the step API."""

from keras_sd3.keras_backend import require

require()  # a clear error for a missing or unknown backend, before Keras is imported

from keras_sd3.models.backbone import StableDiffusion3Backbone
from keras_sd3.models.config import SD3_MEDIUM, SD3_VAE, SD35_LARGE, SD35_MEDIUM, MMDiTConfig, VAEConfig
from keras_sd3.models.mmdit import MMDiT
from keras_sd3.models.controlnet import ControlNetConfig, SD3ControlNet
from keras_sd3.models.vae import VAE
from keras_sd3.models.clip import CLIPConfig, CLIPTextEncoder
from keras_sd3.models.t5 import T5Config, T5Encoder
from keras_sd3.text.preprocessor import StableDiffusion3TextToImagePreprocessor
from keras_sd3.tasks import StableDiffusion3ImageToImage, StableDiffusion3Inpaint, StableDiffusion3TextToImage
from keras_sd3.tasks import StableDiffusion3ControlNet
