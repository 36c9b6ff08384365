"""The CNN factory: the origin project's network, with its size and optimizer as options."""

from __future__ import annotations

from typing import Any

# Optimizers offered by the CLI (Keras names); any Keras optimizer name works in code.
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd", "nadam", "adamax", "adagrad", "adadelta")
CONV_BLOCKS = 3  # Conv2D + MaxPooling2D(2) pairs


def feature_size(image_size: int, kernel_size: int) -> int:
    """Side of the last pooled feature map for an ``image_size`` input (< 1: too small)."""
    side = image_size
    for _ in range(CONV_BLOCKS):
        side = (side - kernel_size + 1) // 2
    return side


def min_image_size(kernel_size: int) -> int:
    """The smallest input side the network accepts with ``kernel_size``."""
    size = kernel_size
    while feature_size(size, kernel_size) < 1:
        size += 1
    return size


def make_model(
    image_size: int = 150,
    kernel_size: int = 4,
    optimizer: str = "rmsprop",
    learning_rate: float | None = None,
    seed: int | None = None,
) -> Any:
    """The origin's CNN: three Conv2D + pooling blocks, Dense(64), a sigmoid output.

    The input is an RGB picture scaled to [0, 1] by ``worker.preprocess``; the sigmoid
    output is P(female) (see ``training.data``).
    """
    if feature_size(image_size, kernel_size) < 1:
        raise ValueError(
            f"image_size {image_size} is too small for kernel_size {kernel_size}: "
            f"the network needs at least {min_image_size(kernel_size)}"
        )
    from worker.model import configure_tensorflow

    configure_tensorflow()
    import keras
    from keras import layers

    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(image_size, image_size, 3)),
            layers.Conv2D(32, kernel_size, activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Dropout(0.25),
            layers.Conv2D(32, kernel_size, activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, kernel_size, activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(1, activation="sigmoid"),
        ],
        name="genderscore_cnn",
    )
    opt: Any = optimizer
    if learning_rate is not None:
        opt = keras.optimizers.get(
            {"class_name": optimizer, "config": {"learning_rate": learning_rate}}
        )
    model.compile(optimizer=opt, loss="binary_crossentropy", metrics=["accuracy"])
    return model
