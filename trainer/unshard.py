"""Parameter-server training's models made ordinary: one process, whole variables.

Under ParameterServerStrategy the chief's models hold their variables on the ps tasks, embedding
tables split into shards (ShardedVariable). Evaluating, checkpointing and exporting such models would
read every table over the network, and a SavedModel of them would carry the shards. So once training
ends the chief builds the same models outside the strategy and copies the trained weights in through a
checkpoint (a ShardedVariable checkpoints as one whole tensor, so it restores into a plain variable).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute.sharded_variable import ShardedVariable

from trainer.fit import build_model

TOLERANCE = 1e-5  # float32 reads of the same weights, summed in another order by the sharded lookup


def sharded_tables(*models) -> dict[str, list[dict]]:
    """Each ShardedVariable of the models: its name -> per shard its shape and the device holding it."""
    out: dict[str, list[dict]] = {}
    for model in models:
        if model is None:
            continue
        for module in model.submodules:
            for value in vars(module).values():
                if isinstance(value, ShardedVariable):
                    out[_whole_name(value)] = [{"shape": [int(d) for d in shard.shape], "device": shard.device}
                                               for shard in value.variables]
    return dict(sorted(out.items()))


def _whole_name(variable: ShardedVariable) -> str:
    name = variable.variables[0].name
    return name.split("/part_0")[0]


def local_copy(model, rebuild: Callable[[], object], sample_batch,
               probe: Callable[[object, dict], object]) -> tuple[object, float]:
    """`rebuild()` (the same model, built outside any strategy) with `model`'s trained weights (the
    optimizer's state stays behind: the copy is for evaluation, checkpoints and export), and the largest
    difference between `probe(model, batch)` and `probe(copy, batch)` on `sample_batch`, which must be
    (close to) none: otherwise the copy is refused."""
    default = tf.distribute.get_strategy()
    copy = rebuild()
    build_model(copy, sample_batch, default)
    # The loss as training builds it: the export saves the whole model, and a layer never called (the
    # TFRS task) would be saved incompletely, with a warning.
    copy.compute_loss(sample_batch, training=True)
    copy.reset_metrics()
    with tempfile.TemporaryDirectory(prefix="adrec-unshard-") as tmp:
        path = tf.train.Checkpoint(**model.checkpoint_parts()).write(str(Path(tmp) / "weights"))
        tf.train.Checkpoint(**copy.checkpoint_parts()).read(path).assert_existing_objects_matched()
    difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
                     for a, b in zip(tf.nest.flatten(probe(model, sample_batch)),
                                     tf.nest.flatten(probe(copy, sample_batch)), strict=True))
    if not difference <= TOLERANCE:
        raise RuntimeError(f"the local copy of a parameter-server model answers differently from it (largest "
                           f"difference {difference:.3g} on a training batch): not exported")
    return copy, difference
