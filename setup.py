"""keras-glas: gland segmentation in colon histology (GlaS@MICCAI'2015) with Keras 3 / TensorFlow.

Install with exactly one TensorFlow flavour:
    pip install -e ".[cpu]"        # tensorflow-cpu (default, what CI uses)
    pip install -e ".[gpu]"        # tensorflow[and-cuda] for NVIDIA GPUs
The two wheels provide the same `tensorflow` package and must not be installed together.
"""
from setuptools import find_packages, setup

TENSORFLOW_VERSION = "2.21.0"

setup(
    name="keras-glas",
    version="0.1.0",
    description="Keras 3 / TensorFlow toolkit for gland segmentation on GlaS@MICCAI'2015",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["keras_glas", "keras_glas.*", "tfds_glas", "tfds_glas.*"]),
    package_data={
        "keras_glas": ["resources/*.csv"],
        "tfds_glas.glas": ["*.tsv", "*.bib", "*.txt", "dummy_data/**/*", "dummy_data/*"],
    },
    include_package_data=True,
    install_requires=[
        "keras==3.15.1",
        "keras-cv==0.9.0",
        "tensorflow-datasets==4.9.10",
        # The `tfds` command of tensorflow-datasets 4.9.10 does not start without these two,
        # and `tfds build` needs importlib_resources to read a builder's checksums.
        "apache-beam==2.77.0",
        "mlcroissant==1.1.1",
        "importlib_resources==7.1.0",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "scikit-image==0.26.0",
        "opencv-python-headless==5.0.0.93",
        "pillow==12.3.0",
        "pyyaml==6.0.4",
        "matplotlib==3.11.2",
        "tqdm==4.70.1",
        "psutil==7.2.2",
        # tensorflow-cpu 2.21 does not pull in TensorBoard; the training CLI logs to it.
        "tensorboard==2.21.0",
    ],
    extras_require={
        "cpu": [f"tensorflow-cpu=={TENSORFLOW_VERSION}"],
        "gpu": [f"tensorflow[and-cuda]=={TENSORFLOW_VERSION}"],
        "test": ["pytest==9.2.0", "dill==0.4.1", "ruff==0.17.6"],  # tfds.testing imports dill
    },
)
