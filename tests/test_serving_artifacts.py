"""The files tensorflow/serving reads beside the SavedModels: models.config, batching and
monitoring configs, and per-version warmup requests built from made-up rows (no real user's)."""

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.config import read_model_config
from serving.servable import Servable
from serving.warmup import read_warmup_file, warmup_path
from trainer import serving_artifacts
from trainer.export import MODEL_NAMES, export_all


def _export_dir(exported) -> Path:
    return exported.paths["recommender"].parent.parent


def test_model_config_parses_with_tf_serving_protos(exported_tiny):
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((_export_dir(exported_tiny) / "models.config").read_text(), config)
    entries = {c.name: c for c in config.model_config_list.config}
    assert set(entries) == set(MODEL_NAMES)
    for name, entry in entries.items():
        assert entry.base_path == f"/models/{name}" and entry.model_platform == "tensorflow"
        assert entry.model_version_policy.WhichOneof("policy_choice") == "latest"
    # The embedded server reads the same file; /models maps to the file's directory.
    resolved = {e.name: e.base_path for e in read_model_config(_export_dir(exported_tiny) / "models.config")}
    assert resolved == {n: exported_tiny.paths[n].parent for n in MODEL_NAMES}


def _tf_serving_messages():
    """BatchingParameters and MonitoringConfig as TF Serving's .proto files declare them
    (session_bundle_config.proto, monitoring_config.proto; tensorflow-serving-api ships neither)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    f = descriptor_pb2.FileDescriptorProto(name="tf_serving_subset.proto", package="tensorflow.serving",
                                           dependency=["google/protobuf/wrappers.proto"], syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto
    batching = f.message_type.add(name="BatchingParameters")
    for number, field in enumerate(["max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                                    "num_batch_threads"], start=1):
        batching.field.add(name=field, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                           type_name=".google.protobuf.Int64Value")
    batching.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    batching.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus = f.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    monitoring = f.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                         type_name=".tensorflow.serving.PrometheusConfig")
    pool.Add(f)
    get = lambda n: message_factory.GetMessageClass(pool.FindMessageTypeByName(n))  # noqa: E731
    return get("tensorflow.serving.BatchingParameters"), get("tensorflow.serving.MonitoringConfig")


def test_batching_and_monitoring_configs_parse(exported_tiny):
    batching_cls, monitoring_cls = _tf_serving_messages()
    batching = text_format.Parse((_export_dir(exported_tiny) / "batching_parameters.txt").read_text(),
                                 batching_cls())
    assert batching.max_batch_size.value >= 8 and batching.batch_timeout_micros.value > 0
    monitoring = text_format.Parse((_export_dir(exported_tiny) / "monitoring.config").read_text(),
                                   monitoring_cls())
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_warmup_requests_are_made_up_rows_of_known_values_and_replay(exported_tiny, trained_tiny):
    schema, vocab = trained_tiny.schema, trained_tiny.vocabularies
    train_users = set(trained_tiny.split.train[schema.user_id])
    titles = dict(zip(trained_tiny.catalog[schema.ad_id], trained_tiny.catalog["title"], strict=True))
    for name in MODEL_NAMES:
        path = exported_tiny.paths[name]
        assert warmup_path(path).is_file(), name
        requests = read_warmup_file(path)
        assert [len(r.inputs["user_id"].string_val) for r in requests] == list(serving_artifacts.WARMUP_BATCH_SIZES)
        servable = Servable(name, 1, path)
        try:
            in_infos, _ = servable.signature()
            assert set(requests[0].inputs) == set(in_infos)
            users = {u.decode() for r in requests for u in r.inputs["user_id"].string_val}
            assert users == {serving_artifacts.WARMUP_USER} and not users & train_users  # no real user's row
            for feature in (*schema.user_categoricals, *schema.context_categoricals):  # known values, mixed
                sent = {v.decode() for r in requests for v in r.inputs[feature].string_val}
                assert sent <= set(vocab[feature]) and len(sent) > 1, feature
            if name == "ranking":
                for r in requests:
                    ads = [a.decode() for a in r.inputs["ad_id"].string_val]
                    assert [t.decode() for t in r.inputs["title"].string_val] == [titles[a] for a in ads]
            assert servable.warmup() == len(requests)  # replayed through the TF1 session
        finally:
            servable.close()


def test_failed_warmup_staging_publishes_nothing(trained_tiny, monkeypatch, tmp_path):
    real = serving_artifacts.write_warmup_requests

    def fail_on_recommender(version_dir, model_name, *args):
        if model_name == "recommender":
            raise ValueError("warmup rows unusable")
        return real(version_dir, model_name, *args)

    monkeypatch.setattr(serving_artifacts, "write_warmup_requests", fail_on_recommender)
    with pytest.raises(ValueError, match="warmup rows unusable"):
        export_all(trained_tiny, tmp_path / "models")
    leftovers = [p for p in (tmp_path / "models").rglob("*") if p.is_dir()]
    assert all(not p.name.isdigit() and not p.name.startswith(".tmp") for p in leftovers), leftovers
    assert not (tmp_path / "models" / "models.config").exists()
