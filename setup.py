"""Packaging for the BEiT-3 pretraining system.

The repository keeps the user's flat layout (``model/``, ``data_pipeline/``, ``pretrain/``,
``finetune/``), but nothing is installed under those generic names: every folder is mapped
under the ``beit3`` namespace (``beit3.model`` -> ``model/``), which is an implicit namespace
package, so both editable and regular installs import ``beit3.model``.
"""
from setuptools import find_packages, setup

FOLDERS = ("model", "data_pipeline", "runtime", "pretrain", "finetune", "demo", "testing")

packages: list[str] = []
package_dir: dict[str, str] = {}
for folder in FOLDERS:
    for sub in [""] + [f".{p}" for p in find_packages(folder)]:
        name = f"beit3.{folder}{sub}"
        packages.append(name)
        package_dir[name] = folder + sub.replace(".", "/")

setup(
    name="beit3-pretrain",
    version="0.1.0",
    description="BEiT-3 pretraining system: Multiway Transformer, data pipeline, DeepSpeed pretraining and fine-tuning",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"beit3.runtime": ["../ds_configs/*.json"], "beit3.finetune": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16",
        "webdataset>=0.2.90",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "xxhash",  # checkpoint file checksums (runtime/ckpt_io.py)
        "numpy",
        "pillow",
        "tqdm",
        "pyyaml",
        # remote shards (s3://, http(s)://; gs:// also needs gcsfs) and the node-local shard cache
        "fsspec[http]",
        "s3fs>=2024.6",  # older releases are what pip falls back to beside boto3 (moto), and fsspec warns they are very slow
        "filelock",
    ],
    extras_require={
        # test tier: real data (scikit-learn digits) and the official implementation for parity
        "test": ["pytest", "pytest-xdist==3.8.0", "scikit-learn", "torchscale==0.3.0", "timm", "moto[server]",
                 "gcsfs>=2024.6", "gcp-storage-emulator"],  # gs:// shards against a loopback emulator
        "gcs": ["gcsfs>=2024.6"],  # gs:// shards
        "imagenet": ["timm"],  # data.train_transform=timm_imagenet (the official ImageNet training view)
    },
)
