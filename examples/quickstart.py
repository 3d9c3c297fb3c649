"""Quickstart: distil a 64-100-100-10 MLP into a 64-16-10 MLP on digits, export it, serve it.

python examples/quickstart.py [--epochs 20] [--out DIR]
"""

import argparse
import tempfile

import keras
import numpy as np
import tensorflow as tf

import kdtfp


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
        "--epochs", type=int, default=20, help="epochs for the teacher and for the student"
    )
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    data = kdtfp.datasets.load_digits_split()  # 1200 train / 197 val / 400 test, pixels in [0, 1]
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # 1. The teacher: any Keras model that outputs logits, trained the usual way.
    teacher = kdtfp.teachers.mlp(64, hidden=(100, 100), num_outputs=10, name="teacher", seed=0)
    teacher.compile(optimizer="adam", loss=cross_entropy)
    teacher.fit(data.x_train, data.y_train, epochs=args.epochs, batch_size=32, verbose=0)

    # 2. Distil it into a much smaller student: soft targets at T = 2 plus a little label loss.
    student = kdtfp.teachers.mlp(64, hidden=(16,), num_outputs=10, name="student", seed=1)
    distiller = kdtfp.Distiller(
        student,
        teacher,
        objectives=[(kdtfp.losses.SoftTargetKL(temperature=2.0), 1.0)],
        student_loss=cross_entropy,
        student_loss_weight=0.1,
    )
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = distiller.fit(
        data.x_train, data.y_train, epochs=args.epochs, batch_size=32, verbose=0
    )
    print(
        "last epoch:",
        ", ".join(f"{name} {values[-1]:.4f}" for name, values in history.history.items()),
    )
    student_acc = accuracy(student, data.x_test, data.y_test)
    teacher_acc = accuracy(teacher, data.x_test, data.y_test)
    print(f"test accuracy: student {student_acc:.3f}, teacher {teacher_acc:.3f}")

    # 3. Export the student alone and serve it with plain TensorFlow (kdtfp is not needed there).
    out = args.out or tempfile.mkdtemp(prefix="kdtfp-quickstart-")
    path = kdtfp.export.export_student(distiller, f"{out}/student")
    served = tf.saved_model.load(path)
    probs = served.serve(tf.constant(data.x_test[:8])).numpy()
    np.testing.assert_allclose(probs, tf.nn.softmax(student(data.x_test[:8])).numpy(), atol=1e-5)
    print(
        f"exported to {path}; served classes {probs.argmax(-1).tolist()}, true {data.y_test[:8].tolist()}"
    )


if __name__ == "__main__":
    main()
