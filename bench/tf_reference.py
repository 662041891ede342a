"""The same models in TensorFlow, timed the way `alexnet bench` times ours: the yardstick.

    python bench/tf_reference.py seed      # AlexNet for MNIST: batch 64 training (Adam), batch 1000 inference
    python bench/tf_reference.py alexnet   # the paper's single-tower AlexNet, 227x227x3, batch 16 (SGD momentum)

Needs `pip install tensorflow-cpu` (2.21 measured). Uses all cores, like our default. Prints
the median of 7 timed runs after warm-up, as `alexnet bench` does. Random inputs of the right
shape: throughput does not depend on pixel values.
"""
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

L = tf.keras.layers


def lrn(radius, bias, alpha, beta):
    return L.Lambda(lambda x: tf.nn.local_response_normalization(x, radius, bias, alpha, beta))


def seed_model():
    x = inp = L.Input((28, 28, 1))
    for ch in (64, 128, 256):
        x = L.Conv2D(ch, 3, padding="same", activation="relu", kernel_initializer="he_normal")(x)
        x = L.MaxPool2D(3, 2, padding="same")(x)
        x = lrn(4, 1.0, 0.001 / 9.0, 0.75)(x)
        x = L.Dropout(0.2)(x)
    x = L.Flatten()(x)
    x = L.Dense(1024, activation="relu", kernel_initializer="he_normal")(x)
    x = L.Dense(1024, activation="relu", kernel_initializer="he_normal")(x)
    return tf.keras.Model(inp, L.Dense(10)(x)), (28, 28, 1), 10


def paper_alexnet():
    x = inp = L.Input((227, 227, 3))
    x = L.Conv2D(96, 11, 4, activation="relu")(x)
    x = lrn(2, 2.0, 1e-4, 0.75)(x)
    x = L.MaxPool2D(3, 2)(x)
    x = L.Conv2D(256, 5, padding="same", activation="relu")(x)
    x = lrn(2, 2.0, 1e-4, 0.75)(x)
    x = L.MaxPool2D(3, 2)(x)
    x = L.Conv2D(384, 3, padding="same", activation="relu")(x)
    x = L.Conv2D(384, 3, padding="same", activation="relu")(x)
    x = L.Conv2D(256, 3, padding="same", activation="relu")(x)
    x = L.MaxPool2D(3, 2)(x)
    x = L.Flatten()(x)
    x = L.Dropout(0.5)(x)
    x = L.Dense(4096, activation="relu")(x)
    x = L.Dropout(0.5)(x)
    x = L.Dense(4096, activation="relu")(x)
    return tf.keras.Model(inp, L.Dense(1000)(x)), (227, 227, 3), 1000


def cpu_times():
    """(total, steal) ticks of all CPUs from /proc/stat, as `alexnet bench` reads them; None
    where the system does not say."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
        return (sum(fields), fields[7]) if len(fields) == 8 else None
    except (OSError, ValueError):
        return None


def steal_since(before):
    """The share of CPU time since `before` that the hypervisor gave to other work."""
    after = cpu_times()
    if before is None or after is None or after[0] == before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "seed"
    if which == "seed":
        (model, shape, classes), batch, infer_batch, steps = seed_model(), 64, 1000, 20
        opt = tf.keras.optimizers.Adam(1e-3, epsilon=1e-8)
    else:
        (model, shape, classes), batch, infer_batch, steps = paper_alexnet(), 16, 16, 5
        opt = tf.keras.optimizers.SGD(0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.random((batch,) + shape, dtype=np.float32))
    y = tf.constant(rng.integers(0, classes, batch))
    xi = tf.constant(rng.random((infer_batch,) + shape, dtype=np.float32))

    @tf.function(jit_compile=False)
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss

    @tf.function
    def infer():
        return model(xi, training=False)

    for _ in range(3):
        train_step().numpy()
        infer().numpy()
    train, inference, steal = [], [], []
    for _ in range(7):
        before = cpu_times()
        t = time.perf_counter()
        for _ in range(steps):
            loss = train_step()
        loss.numpy()
        train.append(steps * batch / (time.perf_counter() - t))
        t = time.perf_counter()
        infer().numpy()
        infer().numpy()
        inference.append(2 * infer_batch / (time.perf_counter() - t))
        steal.append(steal_since(before))
    print(f"tensorflow {tf.__version__} {which}: training {statistics.median(train):.1f} samples/s (batch {batch}), "
          f"inference {statistics.median(inference):.1f} samples/s (batch {infer_batch})")
    print("  training runs:", " ".join(f"{v:.0f}" for v in train))
    print("  inference runs:", " ".join(f"{v:.0f}" for v in inference))
    if None not in steal:
        print("  hypervisor steal per run (training and inference):", " ".join(f"{100 * v:.1f}%" for v in steal))


if __name__ == "__main__":
    main()
