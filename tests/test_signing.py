"""Signed models: the OpenSSF model-signing signature is checked before anything is published or served.

The fixtures are signed here, with the `model-signing` package itself, in key mode (an EC P-256 key) and in
certificate mode (a root CA, an intermediate in the bundle, a leaf with a code-signing key usage), with no
network. Each failure must exit 4 with one line saying what did not match, and publish nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509  # the signing extra (model-signing) brings cryptography; the test extra has it
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.helpers import error_line, heavy_modules_loaded, upload_model, weightsync

SIG = "model.sig"


def _write_key(key: ec.EllipticCurvePrivateKey, directory: Path, name: str) -> tuple[Path, Path]:
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _certificate(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, ca: bool, email: str | None = None) -> x509.Certificate:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=2 if ca else 1)  # CAs valid when the leaf starts
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True))
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        if email:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A signing key pair, an unrelated public key, and a CA chain (root, intermediate, leaf) plus another root."""
    directory = tmp_path_factory.mktemp("keys")
    signer, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    paths: dict[str, Path] = {}
    paths["key"], paths["pub"] = _write_key(signer, directory, "signer")
    _, paths["other_pub"] = _write_key(other, directory, "other")
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _certificate("Test Root CA", root_key, None, root_key, ca=True)
    inter = _certificate("Test Intermediate CA", inter_key, root, root_key, ca=True)
    leaf = _certificate("model-signer", leaf_key, inter, inter_key, ca=False, email="signer@example.com")
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _certificate("Another Root CA", stranger_key, None, stranger_key, ca=True)
    for name, certificate in (("root", root), ("inter", inter), ("leaf", leaf), ("other_root", stranger)):
        paths[name] = directory / f"{name}.pem"
        paths[name].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths["leaf_key"], _ = _write_key(leaf_key, directory, "leaf")
    return paths


def sign(model: Path, keys: dict[str, Path], mode: str = "key", bundle: Path | None = None) -> Path:
    """Sign `model` as its publisher would: the bundle in the model as model.sig (ignored by the signature)."""
    from model_signing import hashing, signing

    bundle = bundle or model / SIG
    config = signing.Config()
    if mode == "key":
        config = config.use_elliptic_key_signer(private_key=keys["key"])
    else:
        config = config.use_certificate_signer(private_key=keys["leaf_key"], signing_certificate=keys["leaf"],
                                               certificate_chain=[keys["inter"]])
    ignored = [SIG] if bundle.parent == model else []
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True))
    config.sign(model, bundle)
    return bundle


@pytest.fixture
def model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "tiny"}')
    (folder / "model.safetensors").write_bytes(b"\x01" * 300_000)
    (folder / "tokenizer" / "vocab.txt").write_text("hello\nworld\n")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # every Hub repo has one; never signed
    return folder


def sync(source: Path | str, dest: Path, env: dict[str, str], *flags: str):
    return weightsync("sync", "--source", str(source), "--dest", str(dest), *flags, env=env)


def published(dest: Path) -> list[Path]:
    return [p for p in dest.glob("*/revisions/*") if p.is_dir()]


def test_a_key_signed_model_publishes_and_reports_its_signer(model, keys, tmp_path, clean_env):
    sign(model, keys)
    dest = tmp_path / "v"
    result = sync(model, dest, clean_env, "--trust-key", str(keys["pub"]), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [done] = [e for e in events if e["event"] == "published"]
    assert done["signature"]["file"] == SIG and done["signature"]["signer"].startswith("key sha256:"), done
    assert done["verification"].startswith("signature model.sig by key sha256:"), done["verification"]
    manifest = json.loads(next(dest.glob("*/manifests/*.json")).read_text())
    assert manifest["signature"]["policy"] == done["signature"]["policy"]
    status = weightsync("status", "--dest", str(dest), env=clean_env)
    assert "signed by: key sha256:" in status.stdout, status.stdout


def test_a_certificate_signed_model_publishes_and_names_the_certificate(model, keys, tmp_path, clean_env):
    sign(model, keys, mode="certificate")
    result = sync(model, tmp_path / "v", clean_env, "--trust-certificate", str(keys["root"]),
                  "--trust-identity", "signer@example.com")
    assert result.returncode == 0, result.stderr
    assert "signature model.sig by CN=model-signer (signer@example.com) issued by CN=Test Intermediate CA" \
        in result.stderr, result.stderr


@pytest.mark.parametrize("tamper", ["changed-file", "extra-file", "missing-file"])
def test_a_model_changed_after_signing_exits_4_and_publishes_nothing(model, keys, tmp_path, clean_env, tamper):
    sign(model, keys)
    if tamper == "changed-file":
        (model / "config.json").write_text('{"model_type": "evil"}')
    elif tamper == "extra-file":
        (model / "tokenizer" / "added.py").write_text("import os")
    else:
        (model / "tokenizer" / "vocab.txt").unlink()
    dest = tmp_path / "v"
    result = sync(model, dest, clean_env, "--trust-key", str(keys["pub"]))
    assert result.returncode == 4, result.stderr
    line = error_line(result)
    assert line.startswith("weightsync: error: ") and "nothing was published" in line, line
    expected = {"changed-file": "config.json", "extra-file": "tokenizer/added.py",
                "missing-file": "tokenizer/vocab.txt"}[tamper]
    assert expected in line, line
    assert published(dest) == [] and not list(dest.glob("*/current"))


def test_the_policy_can_let_named_files_through_unsigned(model, keys, tmp_path, clean_env):
    sign(model, keys)
    (model / "README.md").write_text("added by the repo's maintainers after signing")
    refused = sync(model, tmp_path / "a", clean_env, "--trust-key", str(keys["pub"]))
    assert refused.returncode == 4 and "README.md is not covered" in error_line(refused), refused.stderr
    allowed = sync(model, tmp_path / "b", clean_env, "--trust-key", str(keys["pub"]), "--signature-ignore", "*.md")
    assert allowed.returncode == 0, allowed.stderr
    assert "(unsigned allowed: *.md)" in allowed.stderr, allowed.stderr


def test_a_signature_by_another_key_or_ca_exits_4(model, keys, tmp_path, clean_env):
    sign(model, keys)
    wrong_key = sync(model, tmp_path / "a", clean_env, "--trust-key", str(keys["other_pub"]))
    assert wrong_key.returncode == 4 and "signed with another key" in error_line(wrong_key), wrong_key.stderr
    sign(model, keys, mode="certificate")
    wrong_ca = sync(model, tmp_path / "b", clean_env, "--trust-certificate", str(keys["other_root"]))
    assert wrong_ca.returncode == 4 and "does not chain to --trust-certificate" in error_line(wrong_ca), \
        wrong_ca.stderr
    wrong_name = sync(model, tmp_path / "c", clean_env, "--trust-certificate", str(keys["root"]),
                      "--trust-identity", "someone-else@example.com")
    assert wrong_name.returncode == 4 and "not by --trust-identity someone-else@example.com" in error_line(
        wrong_name), wrong_name.stderr
    assert published(tmp_path / "a") == published(tmp_path / "b") == published(tmp_path / "c") == []


def test_run_does_not_exec_the_server_when_the_signature_fails(model, keys, tmp_path, clean_env):
    sign(model, keys)
    (model / "config.json").write_text("{}")
    marker = tmp_path / "server-started"
    result = weightsync("run", "--source", str(model), "--dest", str(tmp_path / "v"), "--trust-key",
                        str(keys["pub"]), "--", "sh", "-c", f"touch {marker}", env=clean_env)
    assert result.returncode == 4, result.stderr
    assert not marker.exists()


def test_a_missing_signature_under_a_policy_is_refused_before_any_download(s3_server, bucket, s3_env, s3_proxy,
                                                                            model, keys, tmp_path):
    upload_model(s3_server.client(), bucket, "unsigned", {p.relative_to(model).as_posix(): p.read_bytes()
                                                          for p in model.rglob("*") if p.is_file()})
    s3_proxy.stats.reset()
    result = sync(f"s3://{bucket}/unsigned", tmp_path / "v", s3_env, "--trust-key", str(keys["pub"]))
    assert result.returncode == 4, result.stderr
    assert "has no model.sig next to the model" in error_line(result) and "nothing was downloaded" in error_line(
        result)
    assert s3_proxy.stats.bytes_down < 100_000, "the 300 KB shard must not have been downloaded"


def test_a_signed_s3_model_warm_starts_with_zero_requests(s3_server, bucket, s3_env, s3_proxy, model, keys, tmp_path):
    sign(model, keys)
    upload_model(s3_server.client(), bucket, "signed", {p.relative_to(model).as_posix(): p.read_bytes()
                                                        for p in model.rglob("*") if p.is_file()})
    dest = tmp_path / "v"
    first = sync(f"s3://{bucket}/signed", dest, s3_env, "--trust-key", str(keys["pub"]))
    assert first.returncode == 0, first.stderr
    revision = Path(first.stdout.splitlines()[-1]).name
    s3_proxy.stats.reset()
    warm = sync(f"s3://{bucket}/signed", dest, s3_env, "--trust-key", str(keys["pub"]), "--revision", revision)
    assert warm.returncode == 0, warm.stderr
    assert s3_proxy.stats.connections == 0, "a pinned warm start under the same policy makes no request"
    assert "signature model.sig by key sha256:" in warm.stderr and "checked when published" in warm.stderr, warm.stderr
    code, heavy = heavy_modules_loaded("sync", "--source", f"s3://{bucket}/signed", "--dest", str(dest),
                                       "--trust-key", str(keys["pub"]), "--revision", revision, env=s3_env)
    assert code == 0 and heavy == [], "nor imports model-signing, cryptography or boto3"


def test_a_revision_published_without_the_policy_is_checked_on_the_volume_at_warm_start(model, keys, tmp_path,
                                                                                       clean_env):
    sign(model, keys)
    dest = tmp_path / "v"
    first = sync(model, dest, clean_env)
    assert first.returncode == 0, first.stderr
    revision = Path(first.stdout.splitlines()[-1]).name
    checked = sync(model, dest, clean_env, "--revision", revision, "--trust-key", str(keys["pub"]))
    assert checked.returncode == 0 and "checked now, against the files re-hashed" in checked.stderr, checked.stderr
    published_config = next(dest.glob(f"*/revisions/{revision}/config.json"))
    published_config.chmod(0o644)
    published_config.write_text(published_config.read_text().replace("tiny", "evil"))  # same size, other bytes
    repaired = sync(model, dest, clean_env, "--revision", revision, "--trust-key", str(keys["pub"]))
    assert repaired.returncode == 0, repaired.stderr
    assert "re-hashing it to check its signature now" in repaired.stderr and "damaged" in repaired.stderr
    assert published_config.read_text() == (model / "config.json").read_text(), "repaired, not served as it was"
    bad = sync(model, tmp_path / "w", clean_env)
    revision_w = Path(bad.stdout.splitlines()[-1]).name
    bad = sync(model, tmp_path / "w", clean_env, "--revision", revision_w, "--trust-key", str(keys["other_pub"]))
    assert bad.returncode == 4 and "signed with another key" in error_line(bad), bad.stderr
    assert "the revision and current are left as they are" in error_line(bad)
    assert next((tmp_path / "w").glob(f"*/revisions/{revision_w}")).is_dir()


def test_verify_re_checks_the_signature(model, keys, tmp_path, clean_env):
    sign(model, keys)
    dest = tmp_path / "v"
    assert sync(model, dest, clean_env, "--trust-key", str(keys["pub"])).returncode == 0
    good = weightsync("verify", "--dest", str(dest), "--trust-key", str(keys["pub"]), env=clean_env)
    assert good.returncode == 0 and "the signature verifies" in good.stderr, good.stderr
    wrong = weightsync("verify", "--dest", str(dest), "--trust-key", str(keys["other_pub"]), env=clean_env)
    assert wrong.returncode == 4 and "signature:" in error_line(wrong), wrong.stderr
    unchecked = weightsync("verify", "--dest", str(dest), env=clean_env)
    assert unchecked.returncode == 0 and "was not re-checked" in unchecked.stderr, unchecked.stderr


def test_a_lockfile_pins_the_signature_bundle(model, keys, tmp_path, clean_env):
    bundle = sign(model, keys, bundle=tmp_path / "outside.sig")
    lock = weightsync("lock", "--source", str(model), "--signature", str(bundle), "--trust-key", str(keys["pub"]),
                      env=clean_env)
    assert lock.returncode == 0, lock.stderr
    body = json.loads(lock.stdout)
    assert body["signature"]["file"] == str(bundle) and len(body["signature"]["sha256"]) == 64
    lockfile = tmp_path / "model.lock.json"
    lockfile.write_text(lock.stdout)
    resigned = sign(model, keys, bundle=tmp_path / "resigned.sig")  # valid, but not the bundle that was locked
    result = weightsync("sync", "--lockfile", str(lockfile), "--dest", str(tmp_path / "v"), "--signature",
                        str(resigned), "--trust-key", str(keys["pub"]), env=clean_env)
    assert result.returncode == 4 and "differs from the one --lockfile" in error_line(result), result.stderr
    unsigned = weightsync("sync", "--lockfile", str(lockfile), "--dest", str(tmp_path / "w"), env=clean_env)
    assert unsigned.returncode == 2 and "was made under a signature policy" in error_line(unsigned), unsigned.stderr


def test_a_trust_policy_that_cannot_work_is_refused_with_exit_2(model, keys, tmp_path, clean_env):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    cases = [(("--trust-key", str(garbage)), "is not a PEM public key"),
             (("--trust-certificate", str(keys["pub"])), "is not a PEM CA certificate"),
             (("--trust-key", str(tmp_path / "absent.pem")), "no such file"),
             (("--signature", "auto"), "needs whom to trust"),
             (("--trust-key", str(keys["pub"]), "--trust-certificate", str(keys["root"])), "give one"),
             (("--trust-issuer", "https://accounts.example.com"), "needs whom to trust")]
    for flags, message in cases:
        result = sync(model, tmp_path / "v", clean_env, *flags)
        assert result.returncode == 2 and message in error_line(result), (flags, result.stderr)
    assert not (tmp_path / "v").exists() or published(tmp_path / "v") == []


def test_a_filtered_sync_of_a_signed_model_checks_what_it_synced_and_fetches_the_signature(model, keys, tmp_path,
                                                                                          clean_env):
    """vLLM-style filters (`--include '*.json' ...`) leave the shards' neighbours out; the signature still covers
    what was synced, and model.sig comes along although no filter names it."""
    sign(model, keys)
    dest = tmp_path / "v"
    result = sync(model, dest, clean_env, "--trust-key", str(keys["pub"]), "--include", "*.json", "--include",
                  "*.safetensors")
    assert result.returncode == 0, result.stderr
    [revision] = published(dest)
    assert sorted(p.name for p in revision.iterdir()) == ["config.json", "model.safetensors", SIG]
    (model / "model.safetensors").write_bytes(b"\x02" * 300_000)  # the filtered-in shard changes: refused
    changed = sync(model, tmp_path / "w", clean_env, "--trust-key", str(keys["pub"]), "--include", "*.json",
                   "--include", "*.safetensors")
    assert changed.returncode == 4 and "model.safetensors is not the file that was signed" in error_line(changed)


@pytest.mark.parametrize("serialization", ["shards", "blake2", "blake3"])
def test_a_bundle_of_another_hash_kind_is_checked_by_model_signing_itself(model, keys, tmp_path, clean_env,
                                                                         serialization):
    """Only sha256-over-files bundles are compared with weightsync's own digests; a sharded or BLAKE2 one is
    verified by model-signing re-hashing the tree, with the same outcomes."""
    from model_signing import hashing, signing

    hashing_config = (hashing.Config().use_shard_serialization(shard_size=100_000) if serialization == "shards"
                      else hashing.Config().use_file_serialization(hashing_algorithm=serialization))
    hashing_config.set_ignored_paths(paths=[SIG], ignore_git_paths=True)
    signing.Config().use_elliptic_key_signer(private_key=keys["key"]).set_hashing_config(hashing_config).sign(
        model, model / SIG)
    good = sync(model, tmp_path / "v", clean_env, "--trust-key", str(keys["pub"]))
    if serialization in ("shards", "blake2"):
        # model-signing 1.1.1 cannot verify these bundles of its own: it reads shard_size back as a float, and
        # names BLAKE2 "blake2b" where its verifier expects "blake2". Refused (fail closed), never published.
        assert good.returncode == 4 and "does not verify" in error_line(good), good.stderr
        return
    assert good.returncode == 0, good.stderr
    (model / "config.json").write_text('{"model_type": "evil"}')
    changed = sync(model, tmp_path / "w", clean_env, "--trust-key", str(keys["pub"]))
    assert changed.returncode == 4 and "config.json" in error_line(changed), changed.stderr


SIGSTORE_SIGNED = Path(__file__).parent / "fixtures" / "sigstore-signed"


def test_a_sigstore_signed_model_verifies_offline_against_a_local_trust_root(tmp_path, clean_env):
    """A real keyless signature (model-signing's own test data), checked with no network: the trust root comes
    from a ClientTrustConfig file, as an air-gapped cluster would mount it."""
    import sigstore

    store = Path(sigstore.__file__).parent / "_store" / "https%3A%2F%2Ftuf-repo-cdn.sigstore.dev"
    trust_root = tmp_path / "trust_config.json"
    trust_root.write_text(json.dumps({"mediaType": "application/vnd.dev.sigstore.clienttrustconfig.v0.1+json",
                                      "trustedRoot": json.loads((store / "trusted_root.json").read_text()),
                                      "signingConfig": json.loads((store / "signing_config.v0.2.json").read_text())}))
    policy = ("--trust-issuer", "https://sigstore.verify.ibm.com/oauth2", "--trust-root", str(trust_root))
    good = sync(SIGSTORE_SIGNED, tmp_path / "v", clean_env, "--exclude", "ignore-me", "--exclude", "README.md",
                "--trust-identity", "stefanb@us.ibm.com", *policy)
    assert good.returncode == 0, good.stderr
    assert "by stefanb@us.ibm.com issued by" in good.stderr, good.stderr
    other = sync(SIGSTORE_SIGNED, tmp_path / "w", clean_env, "--exclude", "ignore-me", "--exclude", "README.md",
                 "--trust-identity", "someone@example.com", *policy)
    assert other.returncode == 4 and "someone@example.com" in error_line(other), other.stderr
    unsigned_extra = sync(SIGSTORE_SIGNED, tmp_path / "x", clean_env, "--exclude", "README.md",
                          "--trust-identity", "stefanb@us.ibm.com", *policy)
    assert unsigned_extra.returncode == 4 and "ignore-me is not covered by the signature" in error_line(
        unsigned_extra), unsigned_extra.stderr
