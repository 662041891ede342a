"""TensorFlow's accuracy yardstick: the seed model (the notebook's stack, He-normal weights,
zero biases, Adam 1e-3 with TF1's epsilon, batch 64, keep_prob 0.8) trained on the real MNIST
for one or more epochs, reporting the test accuracy after each, for several seeds.

    python bench/tf_mnist_epoch.py [EPOCHS] [SEED ...]     # default: 1 epoch, seeds 1 2 3
"""
import gzip
import os
import sys

import numpy as np
import tensorflow as tf

from tf_reference import seed_model

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "mnist")


def idx(name):
    with gzip.open(f"{DATA}/{name}-ubyte.gz") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def main():
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    seeds = [int(s) for s in sys.argv[2:]] or [1, 2, 3]
    x_train = idx("train-images-idx3")[..., None].astype(np.float32) / 255
    y_train = idx("train-labels-idx1").astype(np.int64)
    x_test = idx("t10k-images-idx3")[..., None].astype(np.float32) / 255
    y_test = idx("t10k-labels-idx1").astype(np.int64)
    for seed in seeds:
        tf.keras.utils.set_random_seed(seed)
        model, _, _ = seed_model()
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3, epsilon=1e-8),
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        accs = []
        for _ in range(epochs):
            model.fit(x_train, y_train, batch_size=64, epochs=1, shuffle=True, verbose=0)
            accs.append(model.evaluate(x_test, y_test, batch_size=1000, verbose=0)[1])
        print(f"seed {seed}: test accuracy per epoch", " ".join(f"{100 * a:.2f}%" for a in accs), flush=True)


if __name__ == "__main__":
    main()
