"""Who made the model: its OpenSSF model-signing signature, checked before anything is published.

A checksum proves the bytes are what the store holds; anyone who can write to the
bucket or repo can change both. A signature (a sigstore bundle over the sha256 of
every file, usually `model.sig` next to the model, made with the PyPI package
`model-signing`) proves who produced them. weightsync checks it at the one moment
that matters: after every byte was verified into staging and before the revision
is published or a server is exec'd.

The trust policy is one of:
- `--trust-key PUBLIC.pem`: signed with that key (EC P-256/384/521);
- `--trust-certificate CA.pem`: signed with a certificate that chains to that CA (and, with
  `--trust-identity`, whose subject or SAN names that identity);
- `--trust-identity ID --trust-issuer URL`: a sigstore keyless signature by that identity, checked
  against `--trust-root` (a sigstore ClientTrustConfig JSON, for air-gapped clusters) or, without
  it, sigstore's public trust root (which needs the network).

The signature must cover exactly the synced files: a file the signature does not list (other than the
signature itself and the git metadata model-signing never signs) is refused, as is a listed file the
source no longer has; a listed file that --include / --exclude leave out is not needed. model-signing does
the cryptography and returns the sha256 it signs of each file; they are compared with the ones weightsync
computed while downloading, so no byte is read twice. This module decides what the result means and says
it in one line.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from weightsync.errors import IntegrityError, UsageError
from weightsync.logs import named

AUTO_FILE = "model.sig"
# What model-signing leaves out of every signature by default (its ignore_git_paths), and so may be synced unsigned.
UNSIGNED_BY_DEFAULT = (".gitattributes", ".gitignore", ".git/*", ".github/*")


@dataclass(frozen=True)
class SignatureRecord:
    """What a published revision's signature was checked against: recorded in its manifest."""

    file: str
    """The bundle: a path in the model (`model.sig`), or the local file given by --signature."""
    sha256: str
    signer: str
    """Who signed, as the bundle and the policy establish it (key fingerprint, certificate subject, identity)."""
    policy: str
    """The trust policy it satisfied, as an id that changes when the trusted material does."""

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "sha256": self.sha256, "signer": self.signer, "policy": self.policy}

    @classmethod
    def from_json(cls, body: object) -> SignatureRecord | None:
        if not isinstance(body, dict):
            return None
        try:
            return cls(file=str(body["file"]), sha256=str(body["sha256"]), signer=str(body["signer"]),
                       policy=str(body["policy"]))
        except KeyError:
            return None


@dataclass(frozen=True)
class SignaturePolicy:
    """Which signature to check (`signature`: `auto` or a local path) and whom to trust."""

    signature: str = "auto"
    key: Path | None = None
    certificate: Path | None = None
    identity: str | None = None
    issuer: str | None = None
    trust_root: Path | None = None
    ignore: tuple[str, ...] = ()
    """Globs of files the policy lets be synced unsigned, on top of UNSIGNED_BY_DEFAULT (--signature-ignore)."""

    @classmethod
    def build(cls, signature: str | None, key: str | None, certificate: str | None, identity: str | None,
              issuer: str | None, trust_root: str | None, ignore: tuple[str, ...] = ()) -> SignaturePolicy | None:
        """The policy the flags ask for (None when none is set); exit 2 for a policy that cannot work."""
        if not (signature or key or certificate or identity or issuer or trust_root or ignore):
            return None
        if key and (certificate or issuer):
            raise UsageError("--trust-key and --trust-certificate / --trust-issuer are two trust policies; give one")
        if not key and not certificate and not (identity and issuer):
            raise UsageError("a signature check needs whom to trust: --trust-key PUBLIC.pem, --trust-certificate "
                             "CA.pem, or --trust-identity with --trust-issuer (sigstore)")
        if key and identity:
            raise UsageError("--trust-identity names a certificate's or a sigstore signer's identity; a --trust-key "
                             "signature has none (the key is the identity): drop one of them")
        if issuer and not identity:
            raise UsageError("--trust-issuer needs --trust-identity (the signer's email or URI)")
        for flag, path in (("--trust-key", key), ("--trust-certificate", certificate), ("--trust-root", trust_root),
                           ("--signature", None if signature in (None, "auto") else signature)):
            if path and not Path(path).is_file():
                raise UsageError(f"{flag} {path}: no such file")
        from importlib.util import find_spec

        if find_spec("model_signing") is None:  # found, not imported: a warm start under a policy never needs it
            raise UsageError("signature checks need the signing extra: pip install 'weightsync[signing]' (the "
                             "weightsync image has it)") from None
        policy = cls(signature=signature or "auto", key=Path(key) if key else None,
                     certificate=Path(certificate) if certificate else None, identity=identity, issuer=issuer,
                     trust_root=Path(trust_root) if trust_root else None, ignore=tuple(ignore))
        policy.id  # noqa: B018  # a key or CA that does not parse is refused now, before any request
        return policy

    @property
    def in_model(self) -> str | None:
        """The path of the bundle inside the model (`auto`), or None for a local --signature file."""
        return AUTO_FILE if self.signature == "auto" else None

    @property
    def id(self) -> str:
        """Whom the policy trusts, and which unsigned files it lets through: equal ids accept the same revisions."""
        unsigned = f" (unsigned allowed: {', '.join(self.ignore)})" if self.ignore else ""
        return self._trusted() + unsigned

    def _trusted(self) -> str:
        """`key sha256:<16 hex>`, `certificate sha256:<16 hex>[ for <identity>]` or `sigstore <identity> via
        <issuer>`: equal ids trust the same signers (the fingerprint is of the key's or CA's DER)."""
        if self.key is not None:
            return f"key sha256:{_fingerprint(self.key, '--trust-key', 'PUBLIC KEY')}"
        if self.certificate is not None:
            text = f"certificate sha256:{_fingerprint(self.certificate, '--trust-certificate', 'CERTIFICATE')}"
            return text + (f" for {self.identity}" if self.identity else "")
        root = f" (trust root sha256:{_file_sha256(self.trust_root)[:16]})" if self.trust_root else ""
        return f"sigstore {self.identity} via {self.issuer}{root}"

    def describe_missing(self, uri: str) -> IntegrityError:
        return IntegrityError(f"{uri} has no {AUTO_FILE} next to the model, and a signature is required "
                              f"({self._trusted()}); nothing was downloaded — sign the model (model_signing sign ...) "
                              "or give the bundle with --signature PATH", path=AUTO_FILE)

    def check(self, tree: Path, digests: dict[str, str], what: str,
              filtered_out: Callable[[str], bool] = lambda _: False,
              outcome: str = "nothing was published") -> SignatureRecord:
        """Check the signature over the synced files; IntegrityError (exit 4) naming what did not match, what to
        do about it, and `outcome` (what the caller did about it: nothing published, left in place, ...).

        `digests` is every synced file's sha256, as weightsync computed it from bytes that matched the source's
        promise. model-signing checks the bundle's cryptography and returns the digests it signs; those are
        compared with ours, so no byte is hashed twice. (A bundle of another kind than sha256 over whole files,
        or a model-signing without that entry point, is checked by model-signing's own `verify`, which re-hashes
        the tree.) A signed file the sync left out on purpose (`filtered_out`: --include / --exclude) is allowed.
        """
        bundle = tree / AUTO_FILE if self.in_model else Path(self.signature)
        shown = self.in_model or self.signature

        def refuse(problem: str, hint: str, **fields: object) -> IntegrityError:
            return IntegrityError(f"{what}: {problem}; {outcome} — {hint}", **fields)  # type: ignore[arg-type]

        if not bundle.is_file():
            raise refuse(f"the signature {shown} is missing while a signature is required ({self._trusted()})",
                         "sign the model (model_signing sign ...) or give the bundle with --signature PATH",
                         path=shown)
        verifier = self._verifier()
        try:
            signed = _signed_digests(verifier, bundle)
            if signed is None:
                verifier.verify(tree, bundle)  # type: ignore[attr-defined]
        except Exception as exc:  # model-signing raises ValueError, cryptography, OpenSSL and sigstore errors
            raise refuse(f"the signature {shown} does not verify ({_reason(exc, self)})",
                         "check that the --trust-* flags name the model's signer, or re-sign the model",
                         path=shown) from exc
        data = bundle.read_bytes()
        body = json.loads(data)
        if signed is None:  # model-signing's own verify matched the tree; only the file names are needed here
            signed = dict.fromkeys(_signed_files(_statement(body)["predicate"]), "")
        else:
            self._compare(signed, digests, shown, filtered_out, refuse)
        unsigned = [f for f in sorted(digests) if f not in signed and f != self.in_model
                    and not any(fnmatchcase(f, pattern) for pattern in (*UNSIGNED_BY_DEFAULT, *self.ignore))]
        if unsigned:
            raise refuse(f"{named(unsigned, 3)} {'is' if len(unsigned) == 1 else 'are'} not covered by the signature "
                         f"{shown} (added after signing?)",
                         f"re-sign the model, remove the file, or let it through with --signature-ignore "
                         f"'{unsigned[0]}'", path=unsigned[0])
        return SignatureRecord(file=shown, sha256=hashlib.sha256(data).hexdigest(), signer=self._signer(body, refuse),
                               policy=self.id)

    @staticmethod
    def _compare(signed: dict[str, str], digests: dict[str, str], shown: str, filtered_out: Callable[[str], bool],
                 refuse: Callable[..., IntegrityError]) -> None:
        changed = [path for path in sorted(signed.keys() & digests.keys()) if signed[path] != digests[path]]
        if changed:
            path = changed[0]
            raise refuse(f"{named(changed, 3)} {'is' if len(changed) == 1 else 'are'} not the file that was signed "
                         f"({path}: sha256 {digests[path]}, {shown} signs {signed[path]})",
                         "restore the file at the source, or re-sign the model", path=path, expected=signed[path],
                         got=digests[path])
        missing = [path for path in sorted(signed.keys() - digests.keys()) if not filtered_out(path)]
        if missing:
            raise refuse(f"{named(missing, 3)} {'is' if len(missing) == 1 else 'are'} signed by {shown} but missing "
                         "from the source (removed after signing?)", "restore it at the source, or re-sign the model",
                         path=missing[0])

    def _verifier(self) -> object:
        from model_signing import verifying  # ~0.25 s of imports: only when a signature is checked

        config = verifying.Config()
        if self.key is not None:
            return config.use_elliptic_key_verifier(public_key=self.key)
        if self.certificate is not None:
            return config.use_certificate_verifier(certificate_chain=[self.certificate], log_fingerprints=False)
        return config.use_sigstore_verifier(identity=self.identity, oidc_issuer=self.issuer,
                                            trust_config=self.trust_root)

    def _signer(self, body: dict, refuse: Callable[..., IntegrityError]) -> str:
        material = body.get("verificationMaterial") or {}
        if self.key is not None:
            return self._trusted()  # the holder of the trusted key: the bundle's own key hint is not signed
        certificates = [c["rawBytes"] for c in (material.get("x509CertificateChain") or {}).get("certificates", [])]
        if not certificates and "certificate" in material:
            certificates = [material["certificate"]["rawBytes"]]
        leaf = _leaf_identity(base64.b64decode(certificates[0])) if certificates else "an unknown certificate"
        if self.certificate is not None and self.identity and self.identity not in leaf:
            raise refuse(f"the signature was made by {leaf}, not by --trust-identity {self.identity}",
                         "check --trust-identity, or re-sign the model with the right certificate")
        return leaf




def _signed_digests(verifier: object, bundle: Path) -> dict[str, str] | None:
    """The sha256 of every file the bundle signs, its signature checked: the first half of model-signing's
    `Config.verify` (read the bundle, verify it, return the signed manifest), without the second (hashing the
    model again). None where the bundle is not sha256 over whole files, or this model-signing lacks the entry
    point (pinned to 1.1.x in pyproject.toml; tests/test_signing.py exercises it)."""
    try:
        from model_signing._signing import sign_sigstore, sign_sigstore_pb

        reader = sign_sigstore if verifier._uses_sigstore else sign_sigstore_pb  # type: ignore[attr-defined]
        inner = verifier._verifier  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return None
    manifest = inner.verify(reader.Signature.read(bundle))
    serialization = manifest.serialization_type
    if serialization.get("method") != "files" or serialization.get("hash_type") != "sha256":
        return None
    return {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}


def _signed_files(predicate: dict) -> set[str]:
    """The files a model-signing predicate covers: resource names, less the `:start:end` of shard resources."""
    sharded = predicate.get("serialization", {}).get("method") == "shards"
    return {r["name"].rsplit(":", 2)[0] if sharded else r["name"] for r in predicate["resources"]}




def _statement(body: dict) -> dict:
    return json.loads(base64.b64decode(body["dsseEnvelope"]["payload"]))


def _reason(exc: BaseException, policy: SignaturePolicy) -> str:
    """model-signing's failure, said as what did not match."""
    text = str(exc).strip()
    kind = type(exc).__name__
    if kind == "InvalidSignature":
        return "the bundle is not signed by the trusted key, or was altered after signing"
    if text.startswith("Key mismatch"):
        return f"it was signed with another key than --trust-key {policy.key}"
    if kind == "X509StoreContextError":
        return f"its certificate does not chain to --trust-certificate {policy.certificate} ({text})"
    if text.startswith("Signature mismatch:"):
        return text.removeprefix("Signature mismatch:").strip().strip("[]").strip("\"'")
    if kind in ("JSONDecodeError", "KeyError", "ValidationError", "AttributeError"):
        return f"not a model-signing bundle of the kind the policy expects ({kind}: {text[:120]})"
    return f"{kind}: {text[:200]}"


def _file_sha256(path: Path | None) -> str:
    assert path is not None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fingerprint(path: Path, flag: str, label: str) -> str:
    """sha256 (16 hex) of the first PEM block labelled `label` (its DER); exit 2 if there is none. Parsed here,
    without cryptography, so that a warm start under a policy imports nothing heavy."""
    import re

    text = path.read_bytes().decode("ascii", "replace")
    match = re.search(rf"-----BEGIN {label}-----(.+?)-----END {label}-----", text, re.S)
    try:
        der = base64.b64decode("".join(match.group(1).split()), validate=True) if match else b""
    except ValueError:
        der = b""
    if not der:
        wanted = "a PEM public key" if label == "PUBLIC KEY" else "a PEM CA certificate"
        raise UsageError(f"{flag} {path} is not {wanted} (-----BEGIN {label}-----)")
    return hashlib.sha256(der).hexdigest()[:16]


def _leaf_identity(der: bytes) -> str:
    """`CN=model-signer (signer@example.com) issued by CN=Demo Intermediate CA`: who a certificate names."""
    from cryptography import x509

    certificate = x509.load_der_x509_certificate(der)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alternative = ", ".join(str(name.value) for name in names)
    except x509.ExtensionNotFound:
        alternative = ""
    subject = certificate.subject.rfc4514_string()
    shown = f"{subject} ({alternative})" if alternative and subject else subject or alternative
    return f"{shown} issued by {certificate.issuer.rfc4514_string()}"
