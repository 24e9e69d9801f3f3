"""bert-jax: encoder pretraining objectives in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="bert-jax",
    version="0.1.0",
    description="One Flax encoder, interchangeable pretraining objectives, one sharded loop.",
    python_requires=">=3.11",
    packages=find_packages(include=["bert_jax", "bert_jax.*", "objectives", "objectives.*",
                                    "configs", "configs.*", "launch", "launch.*"]),
    package_data={"bert_jax": ["data/bundled/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "grain>=0.2.12,<0.3",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.7,<1",
        "apache-beam>=2.60,<3",  # launch/prepare_data.py (offline preparation into ArrayRecord)
        # 0.2.1: 0.2.2+ ship a model proto generated for protobuf >= 7, and apache-beam needs
        # protobuf < 7; transformers' tokenizer export reads that proto.
        "sentencepiece>=0.2,<0.2.2",
        "tokenizers>=0.20,<1",  # imported checkpoints' tokenizer.json (WordPiece, BPE)
        "ml-collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "tensorboardX>=2.6,<3",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "protobuf>=4",  # sentencepiece -> Hugging Face tokenizer conversion on export
        "numpy>=1.26",
        # downstream metrics (bert_jax/finetune/scores.py)
        "scipy>=1.11,<2",  # Pearson, Spearman
        "scikit-learn>=1.3,<2",  # accuracy, F1, MCC, MSE
        "seqeval>=1.2.2,<2",  # entity-level precision/recall/F1
        "qwix>=0.1.8,<0.2",  # int8 quantization (bert_jax.compress)
    ],
    extras_require={
        # torch pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5,<6"],
        "gpu": ["jax[cuda12]>=0.7,<0.13"],
        "tpu": ["jax[tpu]>=0.7,<0.13"],
    },
)
