"""Bayesian KD: sample a digits student's posterior under a teacher-informed prior, then serve
its posterior-mean probabilities, 95 % intervals, credible sets and deviance.

python examples/bayesian_kd.py [--epochs 20] [--out DIR]
"""

import argparse
import tempfile

import keras
import numpy as np
import tensorflow as tf

import kdtfp


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=20, help="Adam epochs, and SGLD epochs")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="kdtfp-bkd-")
    keras.utils.set_random_seed(0)
    split = kdtfp.datasets.load_digits_split()
    x, y = split.x_train, split.y_train

    teacher = kdtfp.teachers.mlp(64, (256, 256), 10, name="teacher")
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    teacher.fit(x, y, epochs=args.epochs, verbose=0)

    # The negative log posterior: CE(labels) + lam * CE(teacher). Its mode is the KD student.
    loss = kdtfp.losses.TeacherDirichletPosterior(lam=1.0, temperature=1.0)
    targets = loss.targets(y, teacher.predict(x, verbose=0))  # [N, 1 + K]: label, teacher logits
    student = kdtfp.teachers.mlp(64, (16,), 10, name="student")
    student.compile(keras.optimizers.Adam(1e-2), loss)
    student.fit(x, targets, batch_size=64, epochs=args.epochs, verbose=0)  # the KD solution

    # Four SGLD chains side by side, started at the mode; keep every 10th state after burn-in.
    chains = 4
    model = kdtfp.models.parallel_chains(student, chains)
    model.compile(kdtfp.optimizers.SGLD(1e-4, data_size=len(x) * chains, seed=0), loss)
    steps = args.epochs * (len(x) // 64)
    # A snapshot holds every chain, so max_samples counts snapshots (= samples per chain).
    sampler = kdtfp.callbacks.PosteriorSampler(burn_in=steps // 5, thin=10, max_samples=500)
    repeated = kdtfp.models.repeat_targets(targets, chains)
    model.fit(x, repeated, batch_size=64, epochs=args.epochs, verbose=0, callbacks=[sampler])
    posterior = kdtfp.callbacks.PosteriorSampler.combine(
        kdtfp.models.split_chain_samples(sampler, chains)
    )
    print(f"posterior samples: {len(posterior)} from {chains} chains")

    ensemble = kdtfp.models.PosteriorEnsemble.from_sampler(student, posterior)
    summary = ensemble(split.x_test)
    mean = np.asarray(summary["mean_probs"])
    correct = mean.argmax(-1) == split.y_test
    print(f"test accuracy: BKD {correct.mean():.4f}")
    auroc = kdtfp.metrics.deviance_auroc(np.asarray(summary["deviance"]), correct)
    print(f"deviance AUROC for errors: {auroc:.3f}")

    path = kdtfp.export.export_posterior(ensemble, f"{out}/bkd_student")
    served = tf.saved_model.load(path)  # needs only TensorFlow
    interval = served.intervals(split.x_test[:1])
    print("served mean probabilities:", np.round(served.mean_probs(split.x_test[:1]).numpy(), 3))
    print("95 % upper ends:", np.round(interval["upper"].numpy(), 3))
    print("credible set:", np.flatnonzero(served.credible_set(split.x_test[:1]).numpy()[0]))


if __name__ == "__main__":
    main()
