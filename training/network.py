"""The CNN factory: the origin project's network, with its size and optimizer as options."""

from __future__ import annotations

from typing import Any


def make_model(
    image_size: int = 150,
    kernel_size: int = 4,
    optimizer: str = "rmsprop",
    learning_rate: float | None = None,
    seed: int | None = None,
) -> Any:
    """Conv2D(32) -> pool -> dropout -> Conv2D(32) -> pool -> Conv2D(64) -> pool -> dense -> sigmoid.

    The input is an RGB picture scaled to [0, 1] by ``worker.preprocess``; the sigmoid
    output is P(female) (see ``training.labels``).
    """
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
        opt = keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": learning_rate}})
    model.compile(optimizer=opt, loss="binary_crossentropy", metrics=["accuracy"])
    return model
