"""Signed artifacts: an Ed25519 signature of ``manifest.json``, written as ``manifest.sig``.

The manifest lists the sha256 of every other file of the artifact, so a valid signature of
the manifest's exact bytes covers the whole artifact: changing any file needs a new manifest,
and a new manifest needs the private key. The sha256 check alone only detects corruption
(anyone able to rewrite a file can rewrite the manifest too); the signature is what detects
an attacker, as long as the private key stays off the serving hosts.

``manifest.sig`` holds the 64-byte signature in base64 (one line of ASCII) so that it can be
inspected and copied as text. Keys are PEM files: the private key unencrypted PKCS#8, the
public key SubjectPublicKeyInfo (what ``openssl genpkey -algorithm ed25519`` and
``openssl pkey -pubout`` write, too).

Pure ``cryptography`` (PyCA) + the standard library: a serving host needs nothing else.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from serving.artifact import MAX_MANIFEST_BYTES, ArtifactError, read_regular_file

SIGNATURE_FILE = "manifest.sig"
#: A PEM key file is well under 1 kB; refuse to read big files given by mistake.
MAX_KEY_BYTES = 1 << 16


class SigningError(ArtifactError):
    """A key file or a signature is missing, unreadable or does not match."""


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > MAX_KEY_BYTES:
        raise SigningError(f"{path}: too large for a PEM {what}")
    return data


def _load_key(path: str | Path, private: bool) -> Ed25519PrivateKey | Ed25519PublicKey:
    path = Path(path)
    what = "private key" if private else "public key"
    data = _read_key_file(path, what)
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError:  # cryptography's way of saying "this private key needs a password"
        raise SigningError(
            f"{path}: the private key is encrypted; expected an unencrypted PEM Ed25519 key "
            "(protect it by file permissions: mode 0600, never on serving hosts)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{path}: expected a PEM Ed25519 {what} ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise SigningError(
            f"{path}: expected an Ed25519 {what}, got {type(key).__name__.lstrip('_')}"
        )
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM file ``path`` (unencrypted PKCS#8).

    Raises
    ------
    SigningError
        Naming the file when it is unreadable, encrypted or not an Ed25519 private key.
    """
    return cast(Ed25519PrivateKey, _load_key(path, private=True))


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM file ``path``.

    Raises
    ------
    SigningError
        Naming the file when it is unreadable or not an Ed25519 public key.
    """
    return cast(Ed25519PublicKey, _load_key(path, private=False))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` atomically, never replacing an existing file.

    The bytes go to a temp file beside it (created with mode 0600), which is then hard-linked
    to ``path``: the link fails if ``path`` exists, and ``path`` never appears half-written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate_keypair(private_path: str | Path, public_path: str | Path) -> None:
    """Write a new Ed25519 key pair as PEM files.

    The private key (PKCS#8, unencrypted) gets mode 0600; both files are written atomically
    and neither may exist already: keys are never overwritten.

    Raises
    ------
    SigningError
        When either file exists or cannot be written (naming it).
    """
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise SigningError(f"{private_path}: the private and public key need two files")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SigningError(f"{path}: exists; refusing to overwrite a key file")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    written: list[Path] = []
    try:
        for path, data, mode in (
            (private_path, private_pem, 0o600),
            (public_path, public_pem, 0o644),
        ):
            try:
                _write_new(path, data, mode)
            except FileExistsError:
                raise SigningError(f"{path}: exists; refusing to overwrite a key file") from None
            except OSError as exc:
                raise SigningError(
                    f"{path}: cannot write the key ({exc.strerror or exc})"
                ) from None
            written.append(path)
    except SigningError:
        for path in written:  # no private key without its public half
            path.unlink(missing_ok=True)
        raise


def sign_artifact(directory: str | Path, private_key_path: str | Path) -> Path:
    """Sign ``directory/manifest.json`` with the Ed25519 key in ``private_key_path``.

    Writes ``manifest.sig`` (base64 of the 64-byte signature of the manifest's exact bytes,
    one line) atomically, replacing an older signature, and returns its path.

    Raises
    ------
    SigningError / ArtifactError
        When the key or the manifest cannot be read (naming the file).
    """
    folder = Path(directory)
    key = load_private_key(private_key_path)
    manifest, _ = read_regular_file(folder / "manifest.json", limit=MAX_MANIFEST_BYTES)
    text = base64.b64encode(key.sign(manifest)) + b"\n"
    target = folder / SIGNATURE_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a plain file is wanted
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def verify_manifest(
    directory: str | Path, manifest: bytes, public_key_paths: Sequence[str | Path]
) -> None:
    """Check that ``directory/manifest.sig`` signs the bytes ``manifest`` with one of the keys.

    ``manifest`` are the bytes the caller has read and will parse, so that what is verified
    is what is used. Any one matching key is enough.

    Raises
    ------
    SigningError
        For no keys, an unreadable key file, a missing, malformed or non-matching signature.
    """
    folder = Path(directory)
    paths = [Path(p) for p in public_key_paths]
    if not paths:
        raise SigningError(f"{folder}: no trusted public key given to verify the signature with")
    keys = [load_public_key(p) for p in paths]  # every key file must be readable: say which not
    sig_file = folder / SIGNATURE_FILE
    if not (sig_file.exists() or sig_file.is_symlink()):
        raise SigningError(
            f"{sig_file}: missing: the artifact is not signed, and signed artifacts are required "
            "(sign it with `addons export --sign-key KEY`)"
        )
    raw, _ = read_regular_file(sig_file, limit=1024)
    try:
        signature = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if len(signature) != 64:
        raise SigningError(
            f"{sig_file}: not an Ed25519 signature (expected base64 of 64 bytes on one line)"
        )
    for key in keys:
        try:
            key.verify(signature, manifest)
        except InvalidSignature:
            continue
        return
    names = ", ".join(str(p) for p in paths)
    raise SigningError(
        f"{sig_file}: the signature does not match manifest.json with any trusted key ({names}): "
        "the manifest was changed after signing, or it was signed with another key"
    )


def verify_artifact(directory: str | Path, public_key_paths: Sequence[str | Path]) -> None:
    """Check that ``directory/manifest.sig`` is a valid signature of ``manifest.json`` by one
    of the Ed25519 public keys in ``public_key_paths`` (PEM files).

    This verifies the manifest only; :meth:`serving.artifact.Artifact.load` with
    ``trusted_keys`` does this first and then checks every file against the manifest.

    Raises
    ------
    SigningError
        For an unsigned artifact, a wrong key, a bad signature or an unreadable key file.
    """
    folder = Path(directory)
    manifest, _ = read_regular_file(folder / "manifest.json", limit=MAX_MANIFEST_BYTES)
    verify_manifest(folder, manifest, public_key_paths)
