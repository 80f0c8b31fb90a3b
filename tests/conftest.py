import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The pseudonymisation key of every job and client the tests start (privacy.key_env's default variable),
# as an operator would set it for both: jobs pseudonymise user ids with it, clients hash "u00001" with it.
os.environ.setdefault("ADREC_PSEUDONYM_KEY", "adrec-test-key-not-secret-0123456789")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, **overrides):
    from trainer.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    cfg.training.model_dir = str(tmp / "run")
    cfg.export.export_dir = str(tmp / "models")
    for section, values in overrides.items():
        current = getattr(cfg, section)
        stale = sorted(set(values) - set(type(current).model_fields))
        if stale:  # a stale key would otherwise pass silently
            raise KeyError(f"tiny_config: {section} has no key(s) {stale}")
        # The section's keys together: one at a time, a validated assignment would see half-set states
        # (data.source "spec" before data.spec is set).
        setattr(cfg, section, type(current).model_validate({**current.__dict__, **values}))
    return cfg


def fewer_impressions(n: int) -> dict:
    """tiny.yaml's world with `n` impressions, as a `data` override of `tiny_config`: for tests whose checks
    do not depend on how much the models learn, only on the job running (fewer steps per epoch)."""
    from trainer.config import load_config

    synthetic = load_config(ROOT / "configs" / "tiny.yaml").data.synthetic
    return {"synthetic": synthetic.model_copy(update={"n_impressions": n})}


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    from trainer.job import run_training

    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    return run_training(cfg, progress=False)


@pytest.fixture(scope="session")
def exported_tiny(trained_tiny):
    from trainer.export import export_all

    return export_all(trained_tiny, trained_tiny.config.export.export_dir)


@pytest.fixture()
def export_copy(exported_tiny, tmp_path) -> Path:
    """A private copy of the tiny job's export (version 1 of each model plus models.config), for a
    test that publishes, breaks or rolls back versions."""
    import shutil

    source = exported_tiny.paths["recommender"].parent.parent
    target = tmp_path / "models"
    target.mkdir()
    shutil.copy(source / "models.config", target / "models.config")
    for name in ("retrieval", "ranking", "recommender"):
        shutil.copytree(source / name / "1", target / name / "1")
    return target


@pytest.fixture(scope="session")
def trained_past(tmp_path_factory):
    """A tiny job whose ranking model reads the user counters and both histories, pooled by target
    attention (the candidate's weights over the history ads; mean pooling is the simpler default)."""
    from trainer.job import run_training

    cfg = tiny_config(tmp_path_factory.mktemp("ranking_past"),
                      ranking={"history": True, "negative_history": True, "user_stats": True,
                               "history_pool": "target_attention", "user_id_dropout": 0.3, "epochs": 2},
                      retrieval={"epochs": 1}, evaluation={"baselines": ("most_popular",)})
    cfg.data.synthetic = type(cfg.data.synthetic)(n_users=150, n_advertisers=15, n_ads=80, n_impressions=6000)
    return run_training(cfg, progress=False)


@pytest.fixture(scope="session")
def exported_past(trained_past):
    from trainer.export import export_all

    return export_all(trained_past, trained_past.config.export.export_dir)


def make_self_signed_cert(directory: Path, common_name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed server certificate for localhost / 127.0.0.1 (cryptography, else openssl)."""
    cert, key = directory / f"{common_name}-cert.pem", directory / f"{common_name}-key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        import subprocess

        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "2", "-subj", f"/CN={common_name}", "-keyout", str(key),
                        "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(private.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key
