"""Text: the CLIP and T5 tokenizers and the prompt preprocessor."""

from keras_sd3.text.preprocessor import StableDiffusion3TextToImagePreprocessor
from keras_sd3.text.tokenizers import CLIPTokenizer, T5Tokenizer
