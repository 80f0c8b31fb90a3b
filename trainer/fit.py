"""Fault-tolerant fitting of one training stage (retrieval or ranking).

- `BackupAndRestore` backs the stage up every epoch or N steps; a job killed mid-epoch
  resumes at the step it reached, so no epoch is lost or repeated.
- A finished stage leaves a checkpoint and a DONE marker, so a restarted job does not
  retrain a stage it already completed (`trainer.resume` decides whether they may be reused and
  clears them when the whole job finishes).
- Only the chief writes where others can see; other workers write to private temp dirs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import tensorflow as tf

from trainer.config import JobConfig
from trainer.progress import fit_verbosity, log
from trainer.resume import DONE
from trainer.strategy import is_chief, is_parameter_server


def checkpoint_of(parts: dict) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(**parts)


def _writable(path: Path, strategy) -> Path:
    """The chief writes `path`; other workers write a private temp dir (MWMS saves are collective)."""
    if is_chief(strategy):
        return path
    return Path(tempfile.mkdtemp(prefix=f"adrec-worker-{path.name}-"))


def build_model(model, sample_batch, strategy) -> None:
    """Create every variable before fit, so BackupAndRestore can restore optimizer state too."""
    with strategy.scope():
        model.build_from_batch(sample_batch)
    model.built = True


class LearningRateLogger(tf.keras.callbacks.Callback):
    """Puts the optimizer's learning rate into each epoch's logs, so TensorBoard (which adds it
    only for schedules), the progress bar and the stage history carry it."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        optimizer = self.model.optimizer
        rate = optimizer.learning_rate
        if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(optimizer.iterations)
        logs["learning_rate"] = float(tf.keras.backend.get_value(rate))
        encoder = getattr(self.model, "encoder_optimizer", None)
        if encoder is not None:
            logs["encoder_learning_rate"] = float(tf.keras.backend.get_value(encoder.learning_rate))


class EpochTimer(tf.keras.callbacks.Callback):
    """Wall seconds of each epoch, from its start to its end (with a validation pass, if any)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._last = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(round(self._last_step() - self._start, 3))

    def _last_step(self) -> float:
        return time.perf_counter()


class StepsTimer(EpochTimer):
    """Wall seconds of each epoch's training steps, from the epoch's start to its last batch: without
    the validation pass that follows, so examples / seconds is the training throughput. The first
    epoch also pays for tracing the step function. (A batch hook: ParameterServerStrategy refuses those,
    and runs `EpochTimer`.)"""

    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True  # it never reads the logs, so Keras need not wait for them

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()

    def _last_step(self) -> float:
        return self._last


def _parameter_server_dataset(dataset: tf.data.Dataset) -> tuple[tf.data.Dataset, int]:
    """The dataset as parameter-server training reads it, and its steps per epoch.

    Every worker builds its own copy of the dataset from the same graph, so a seeded shuffle would give
    every worker the same order, and the workers would train on the same batches. So each worker
    shuffles all the rows in its own random order (seeds drawn on the worker; TF's recommended input
    for this strategy: no sharding) and repeats; an epoch is one pass's worth of steps across all
    workers, not an exact pass. Every batch is full: Keras logs the loss of the step that finished
    last, comparable across epochs only at a fixed batch size (the in-batch softmax sums over the batch
    and draws its negatives from it)."""
    def rows(batch) -> int:
        return int(tf.shape(tf.nest.flatten(batch)[0])[0])

    batches = int(dataset.cardinality())
    if batches < 1:
        raise ValueError(f"parameter_server: a training dataset of known length is needed; it has {batches} batches")
    size, last = rows(next(iter(dataset))), rows(next(iter(dataset.skip(batches - 1))))
    steps = batches - (last < size)
    if steps < 1:
        raise ValueError(f"parameter_server: fewer training rows than one batch ({size})")
    with _seeds_drawn_where_run():
        shuffled = dataset.unbatch().shuffle(size * (batches - 1) + last, reshuffle_each_iteration=True)
    return shuffled.batch(size, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE), steps


@contextlib.contextmanager
def _seeds_drawn_where_run():
    """Inside, an unseeded random op gets no seed from the job's global seed: its kernel draws one
    where it runs (on each worker). The global seed is set again afterwards."""
    from tensorflow.python.eager import context

    seed = context.global_seed()
    tf.random.set_seed(None)
    try:
        yield
    finally:
        tf.random.set_seed(seed)


class _DropNotes(logging.Filter):
    """Drops TensorFlow log records that contain any of `notes`."""

    def __init__(self, notes: tuple[str, ...]):
        super().__init__()
        self.notes = notes

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(note in record.getMessage() for note in self.notes)


# TensorFlow notes that say nothing actionable about a parameter-server fit:
# - Keras cannot read the TFRS models' step results (`loss`, `total_loss`, ... are returned by their
#   train_step, not tracked as Keras metrics), so it logs the last finished step's values, each epoch;
# - every epoch's backup checkpoint of sharded variables retraces the saver's function.
PARAMETER_SERVER_NOTES = ("Could not get Model metric results", "MultiDeviceSaver.save.<locals>.tf_function_save")
# Keras times a step from its dispatch to the batch-end hooks, and the hooks of the first batches all
# together; a hook that reads the step's logs (the progress bar's) waits there for the step to finish, so the
# step's own compute is counted as hook time and Keras warns that the hooks outlast the step. The job's
# own batch hook only reads the clock.
HOOK_TIMING_NOTES = ("is slow compared to the batch time",)


@contextlib.contextmanager
def notes_dropped(notes: tuple[str, ...]):
    note = _DropNotes(notes)
    logger = tf.get_logger()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


@contextlib.contextmanager
def _dataset_options_warning_ignored():
    with warnings.catch_warnings():
        # tf.data asks for the dataset's options while the coordinator traces the per-worker dataset
        warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")
        yield


def fit_stage(name: str, model, dataset: tf.data.Dataset, epochs: int, cfg: JobConfig, strategy,
              model_dir: Path, progress: bool, parts: dict, validation: tf.data.Dataset | None = None,
              monitor: str | None = None, metrics: tf.keras.callbacks.Callback | None = None,
              loggers: tuple[tf.keras.callbacks.Callback, ...] = (), steps_per_epoch: int | None = None) -> dict:
    """Fit `model` (or restore it if this stage already finished); returns history and step count.

    Early stopping on `monitor` (restoring the best epoch's weights) needs `validation` or `metrics`,
    a callback that puts the monitored value into each epoch's logs; `loggers` put more values there.
    `steps_per_epoch`: the epoch's length for a dataset that repeats (streamed input)."""
    stage_dir = model_dir / "stages" / name
    done_file = stage_dir / DONE
    backup_dir = model_dir / "backup" / name
    if done_file.exists():
        checkpoint_of(parts).read(str(stage_dir / "stage")).expect_partial()
        state = json.loads(done_file.read_text())
        log(f"{name}: stage already finished ({state['steps']} steps); restored, not retrained")
        return state

    ps = is_parameter_server(strategy)
    steps = steps_per_epoch
    if ps:
        dataset, steps = _parameter_server_dataset(dataset)
    if backup_dir.is_dir() and any(backup_dir.iterdir()):
        log(f"{name}: resuming from the backup in {backup_dir}")
    callbacks = [
        tf.keras.callbacks.BackupAndRestore(
            str(backup_dir), save_freq=cfg.training.backup_every_steps or "epoch"),
        LearningRateLogger(),  # before TensorBoard, which reads the same logs dict
        timer := EpochTimer() if ps else StepsTimer(),
        *((metrics,) if metrics is not None else ()),
        *loggers,
        tf.keras.callbacks.TensorBoard(log_dir=str(model_dir / "logs" / name), update_freq="epoch"),
    ]
    if (validation is not None or metrics is not None) and monitor:
        callbacks.append(tf.keras.callbacks.EarlyStopping(
            monitor=monitor, mode="max", patience=cfg.training.early_stopping_patience,
            restore_best_weights=True, verbose=int(progress)))
    verbose = fit_verbosity(progress)
    notes = HOOK_TIMING_NOTES + (PARAMETER_SERVER_NOTES if ps else ())
    with notes_dropped(notes), _dataset_options_warning_ignored() if ps else contextlib.nullcontext():
        hist = model.fit(dataset, epochs=epochs, steps_per_epoch=steps, validation_data=validation,
                         verbose=min(verbose, 1) * 2 if ps else verbose,  # no progress bar under parameter servers
                         callbacks=callbacks)
    state = {"steps": int(model.optimizer.iterations.numpy()),
             "history": {k: [float(x) for x in v] for k, v in hist.history.items()},
             "epochs": [int(e) + 1 for e in hist.epoch],  # 1-based; a resumed fit lists only the epochs it ran
             "epoch_seconds": timer.seconds}
    target = _writable(stage_dir, strategy)
    target.mkdir(parents=True, exist_ok=True)
    checkpoint_of(parts).write(str(target / "stage"))
    if is_chief(strategy):
        (target / DONE).write_text(json.dumps(state))
    else:
        shutil.rmtree(target, ignore_errors=True)
    return state
