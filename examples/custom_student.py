"""Your own subclassed Keras model as the student, distilled with soft targets + derivative matching.

The student below is an ordinary subclassed `keras.Model` with its own `call`; kdtfp uses it as
is (no rewrite of its forward pass). Derivative matching (Papamakarios 2015) also makes the
student's input-gradients of its class log-probabilities follow the teacher's; in "projection"
mode it costs one extra vector-Jacobian product per step. Being subclassed, the student has no
symbolic input, so its export names the input signature.

    python examples/custom_student.py [--epochs 15] [--out DIR]
"""

import argparse
import tempfile

import keras
import numpy as np
import tensorflow as tf

import kdtfp


class ResidualMLP(keras.Model):
    """`x -> Dense -> [h + Dense(h)] * blocks -> LayerNorm -> Dense(classes)`, outputs logits."""

    def __init__(self, width=32, blocks=2, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_blocks, self.num_classes = width, blocks, num_classes
        self.stem = keras.layers.Dense(width, activation="relu")
        self.blocks = [keras.layers.Dense(width, activation="relu") for _ in range(blocks)]
        self.norm = keras.layers.LayerNormalization()
        self.head = keras.layers.Dense(num_classes)

    def call(self, inputs, training=None):
        h = self.stem(inputs)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "blocks": self.num_blocks,
            "num_classes": self.num_classes,
        }


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="export directory (default: a new temporary directory)"
    )
    parser.add_argument(
        "--epochs", type=int, default=15, help="epochs for the teacher and for the student"
    )
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    data = kdtfp.datasets.load_digits_split()

    teacher = kdtfp.teachers.mlp(64, hidden=(100, 100), num_outputs=10, name="teacher", seed=0)
    teacher.compile(
        optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    teacher.fit(data.x_train, data.y_train, epochs=args.epochs, batch_size=32, verbose=0)

    student = ResidualMLP(width=32, blocks=2, name="residual_student")
    distiller = kdtfp.Distiller(
        student,
        teacher,
        objectives=[
            (kdtfp.losses.SoftTargetKL(temperature=2.0), 1.0),
            (kdtfp.losses.DerivativeMatching(mode="projection"), 10.0),
        ],
        seed=0,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
    # No labels: the student learns from the teacher alone.
    history = distiller.fit(data.x_train, epochs=args.epochs, batch_size=32, verbose=0)
    print(
        "last epoch:",
        ", ".join(f"{name} {values[-1]:.4f}" for name, values in history.history.items()),
    )
    student_acc = accuracy(student, data.x_test, data.y_test)
    teacher_acc = accuracy(teacher, data.x_test, data.y_test)
    print(f"test accuracy: student {student_acc:.3f}, teacher {teacher_acc:.3f}")

    out = args.out or tempfile.mkdtemp(prefix="kdtfp-custom-student-")
    path = kdtfp.export.export_student(
        distiller, f"{out}/residual_student", input_signature=tf.TensorSpec([None, 64], tf.float32)
    )
    served = tf.saved_model.load(path)
    x = tf.constant(data.x_test[:8])
    np.testing.assert_allclose(served.logits(x).numpy(), student(x).numpy(), atol=1e-5)
    print(
        f"exported to {path}; served classes {served.serve(x).numpy().argmax(-1).tolist()}, true {data.y_test[:8].tolist()}"
    )


if __name__ == "__main__":
    main()
