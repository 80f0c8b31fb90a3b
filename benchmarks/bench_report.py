"""The JSON result every benchmark writes: what was measured, when, and on what machine.

Every benchmark imports this module first, so it also sets the quiet defaults of `adrec` before
TensorFlow loads (`trainer/quiet.py`: no C++ banners; `TF_CPP_MIN_LOG_LEVEL=0` brings them back).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a checkout not installed

from trainer.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()


def write_report(out: Path, benchmark: str, **fields) -> dict:
    import tensorflow as tf

    report = {"benchmark": benchmark, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load_average_at_end": os.getloadavg(), "tensorflow": tf.__version__,
                          "devices": [d.name for d in tf.config.list_logical_devices()]},
              **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report
