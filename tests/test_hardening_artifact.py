"""Artifact trust (issue 8, section 5): every broken artifact is a clear ``ArtifactError``
(exit 2 on the command line, never a traceback), symlinks inside an artifact are refused,
and signed artifacts are verified against trusted Ed25519 keys.

Each corruption changes ONE thing in a copy of the committed test artifact
(tests_serving/artifact) and then rewrites the manifest's sha256 of that file, so the hash
check cannot mask the problem being tested.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from serving import ArtifactError, Ranker
from serving import artifact as artifact_module
from serving.artifact import Artifact
from serving.signing import (
    SigningError,
    generate_keypair,
    sign_artifact,
    verify_artifact,
)
from training.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tests_serving" / "artifact"


@pytest.fixture
def art(tmp_path: Path) -> Path:
    folder = tmp_path / "art"
    shutil.copytree(COMMITTED, folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: object) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _rehash(folder: Path) -> None:
    """Make the manifest's sha256 agree with the files again (what an attacker, or a buggy
    exporter, would do)."""
    manifest = _manifest(folder)
    manifest["files"] = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in manifest["files"]
    }
    _write_manifest(folder, manifest)


def _state(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "user_state.npz") as z:
        return {k: z[k] for k in z.files}


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _state_with(folder: Path, **changes: np.ndarray | None) -> bytes:
    """user_state.npz with some arrays replaced (``None``: removed); keys use '_' for '.'."""
    state = _state(folder)
    for key, value in changes.items():
        name = key.replace("_", ".", 1)
        if value is None:
            state.pop(name)
        else:
            state[name] = value
    return _npz(**state)


def _json_with(folder: Path, name: str, change: Callable[[dict], object]) -> bytes:
    return json.dumps(change(json.loads((folder / name).read_text()))).encode()


def _set(d: dict, key: str, value: object) -> dict:
    return {**d, key: value}


# name of the file changed, how (folder -> new bytes), what the error must say
FILE_CORRUPTIONS: dict[str, tuple[str, Callable[[Path], bytes], str]] = {
    "npz object array": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.array([1.0] * 25, dtype=object)),
        "object array",
    ),
    "npz garbage": ("user_state.npz", lambda f: b"not a zip", "not a readable .npz"),
    "npz single array": ("user_state.npz", lambda f: _npy(np.arange(3)), "single array"),
    "npz history missing": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=None),
        "'history.data' is missing",
    ),
    "npz indices out of range": (
        "user_state.npz",
        lambda f: _state_with(f, history_indices=np.full(25, 5, dtype=np.int32)),
        r"must lie in \[0, 5\)",
    ),
    "npz negative index": (
        "user_state.npz",
        lambda f: _state_with(f, history_indices=np.full(25, -1, dtype=np.int32)),
        r"must lie in \[0, 5\)",
    ),
    "npz nan score": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.r_[np.nan, np.ones(24)].astype(np.float32)),
        "NaN or infinite",
    ),
    "npz inf score": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.r_[np.inf, np.ones(24)].astype(np.float32)),
        "NaN or infinite",
    ),
    "npz float overflowing float32": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.r_[1e300, np.ones(24)]),
        "NaN or infinite",
    ),
    "npz float indptr": (
        "user_state.npz",
        lambda f: _state_with(f, history_indptr=np.arange(6, dtype=np.float64) * 5),
        "1-d array of integers",
    ),
    "npz 2-d data": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.ones((5, 5), np.float32)),
        "1-d array of numbers",
    ),
    "npz string data": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.array(["1"] * 25)),
        "1-d array of numbers",
    ),
    "npz indptr one user short": (
        "user_state.npz",
        lambda f: _state_with(f, history_indptr=np.arange(5, dtype=np.int32) * 5),
        "n_users \\+ 1 = 6",
    ),
    "npz indptr decreasing": (
        "user_state.npz",
        lambda f: _state_with(f, history_indptr=np.array([0, 10, 5, 15, 20, 25], np.int32)),
        "never decrease",
    ),
    "npz data shorter than indices": (
        "user_state.npz",
        lambda f: _state_with(f, history_data=np.ones(24, np.float32)),
        "24 values",
    ),
    "npz shape disagrees": (
        "user_state.npz",
        lambda f: _state_with(f, history_shape=np.array([5, 6])),
        r"expected \[5, 5\]",
    ),
    "items not json": ("items.json", lambda f: b"{ids: [1, 2", "expected UTF-8 JSON"),
    "items not utf-8": ("items.json", lambda f: b'{"ids": "\xff"}', "expected UTF-8 JSON"),
    "items a list": ("items.json", lambda f: b"[1, 2, 3, 4, 5]", "expected an addons id map"),
    "items ids not a list": (
        "items.json",
        lambda f: _json_with(f, "items.json", lambda d: _set(d, "ids", 5)),
        "'ids': expected a list",
    ),
    "items string in int ids": (
        "items.json",
        lambda f: _json_with(f, "items.json", lambda d: _set(d, "ids", ["a", 2, 3, 4, 5])),
        r"ids\[0\] = 'a': expected an integer",
    ),
    "items float id": (
        "items.json",
        lambda f: _json_with(f, "items.json", lambda d: _set(d, "ids", [1.5, 2, 3, 4, 5])),
        r"ids\[0\] = 1.5",
    ),
    "items id beyond int64": (
        "items.json",
        lambda f: _json_with(f, "items.json", lambda d: _set(d, "ids", [2**63, 2, 3, 4, 5])),
        "int64 range",
    ),
    "items duplicate ids": (
        "items.json",
        lambda f: _json_with(f, "items.json", lambda d: _set(d, "ids", [1, 2, 3, 4, 4])),
        "not unique",
    ),
    "items shorter than n_items": (
        "items.json",
        lambda f: _json_with(f, "items.json", lambda d: _set(d, "ids", [1, 2, 3, 4])),
        "n_items = 5",
    ),
    "users shorter than n_users": (
        "users.json",
        lambda f: _json_with(f, "users.json", lambda d: _set(d, "ids", [1, 2, 3])),
        "n_users = 5",
    ),
    "users duplicate": (
        "users.json",
        lambda f: _json_with(f, "users.json", lambda d: _set(d, "ids", [1, 1, 3, 4, 5])),
        "not unique",
    ),
    "table not json": ("item_table.json", lambda f: b"\x00\x01", "expected UTF-8 JSON"),
    "table a list": ("item_table.json", lambda f: b"[]", "JSON object of per-item lists"),
    "table price short": (
        "item_table.json",
        lambda f: _json_with(f, "item_table.json", lambda d: _set(d, "price", [1.0])),
        "'price': expected a list of 5",
    ),
    "table price missing": (
        "item_table.json",
        lambda f: _json_with(
            f, "item_table.json", lambda d: {k: v for k, v in d.items() if k != "price"}
        ),
        "'price': expected a list",
    ),
    "table price a string": (
        "item_table.json",
        lambda f: _json_with(f, "item_table.json", lambda d: _set(d, "price", ["1", 2, 3, 4, 5])),
        r"'price'\[0\] = '1': expected a finite number",
    ),
    "table price infinite": (
        "item_table.json",
        lambda f: _json_with(
            f, "item_table.json", lambda d: _set(d, "price", [float("inf"), 2, 3, 4, 5])
        ),
        "finite number",
    ),
    "table in_stock a string": (
        "item_table.json",
        lambda f: _json_with(f, "item_table.json", lambda d: _set(d, "in_stock", ["yes"] * 5)),
        "true/false",
    ),
    "table category a list": (
        "item_table.json",
        lambda f: _json_with(f, "item_table.json", lambda d: _set(d, "category", [["a"]] * 5)),
        "'category'",
    ),
    "table category too long": (
        "item_table.json",
        lambda f: _json_with(f, "item_table.json", lambda d: _set(d, "category", ["a"] * 6)),
        "list of 5",
    ),
    "onnx empty": ("model.onnx", lambda f: b"", "empty file, expected an ONNX model"),
    "onnx garbage": ("model.onnx", lambda f: b"garbage", "not an ONNX model"),
}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


MANIFEST_CORRUPTIONS: dict[str, tuple[Callable[[dict], object], str]] = {
    "a list": (lambda m: [m], "expected a JSON object, got a list"),
    "a string": (lambda m: "manifest", "expected a JSON object, got a str"),
    "n_items a string": (lambda m: _set(m, "n_items", "5"), "field 'n_items': expected an int"),
    "n_items a bool": (lambda m: _set(m, "n_users", True), "field 'n_users'"),
    "n_items missing": (
        lambda m: {k: v for k, v in m.items() if k != "n_items"},
        "field 'n_items' is missing",
    ),
    "n_items larger than items.json": (lambda m: _set(m, "n_items", 6), "n_items = 6"),
    "n_users smaller than users.json": (lambda m: _set(m, "n_users", 4), "n_users = 4"),
    "files a list": (lambda m: _set(m, "files", list(m["files"])), "field 'files'"),
    "a digest not hex": (
        lambda m: _set(m, "files", {**m["files"], "items.json": 5}),
        "field 'files'",
    ),
    "model_kind a number": (lambda m: _set(m, "model_kind", 3), "field 'model_kind'"),
    "metrics a list": (lambda m: _set(m, "metrics", []), "field 'metrics'"),
    "inputs not strings": (lambda m: _set(m, "inputs", [1]), "field 'inputs'"),
    "format unknown": (lambda m: _set(m, "format", "addons.artifact/9"), "expected format"),
    "path in a file name": (
        lambda m: _set(m, "files", {**m["files"], "../x": "0" * 64}),
        "not a plain file name",
    ),
    "manifest lists itself": (
        lambda m: _set(m, "files", {**m["files"], "manifest.json": "0" * 64}),
        "not a plain file name",
    ),
}


def _corrupt_file(folder: Path, case: str) -> str:
    name, make, message = FILE_CORRUPTIONS[case]
    (folder / name).write_bytes(make(folder))
    _rehash(folder)
    return message


def _corrupt_manifest(folder: Path, case: str) -> str:
    change, message = MANIFEST_CORRUPTIONS[case]
    _write_manifest(folder, change(_manifest(folder)))
    return message


def _rank_cli(folder: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["rank", "--model", str(folder), "--cart", "1", *extra])
    return code, capsys.readouterr().err


def test_the_committed_artifact_loads(art: Path) -> None:
    """The baseline every corruption starts from is valid (so each test changes one thing)."""
    loaded = Artifact.load(art)
    assert len(loaded.items.ids) == 5 and len(loaded.history_indptr) == 6
    _rehash(art)  # the helper keeps a valid artifact valid
    assert Artifact.load(art).manifest["n_items"] == 5


@pytest.mark.parametrize("case", sorted(FILE_CORRUPTIONS))
def test_a_corrupted_file_is_a_clear_artifact_error(art: Path, case: str, capsys) -> None:
    message = _corrupt_file(art, case)
    name = FILE_CORRUPTIONS[case][0]
    with pytest.raises(ArtifactError, match=message) as caught:
        Artifact.load(art)
    assert name in str(caught.value)  # names the file
    with pytest.raises(ArtifactError, match=message):
        Ranker.load(art)
    code, err = _rank_cli(art, capsys)
    assert code == 2 and name in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(MANIFEST_CORRUPTIONS))
def test_a_broken_manifest_is_a_clear_artifact_error(art: Path, case: str, capsys) -> None:
    message = _corrupt_manifest(art, case)
    with pytest.raises(ArtifactError, match=message) as caught:
        Artifact.load(art)
    assert "json" in str(caught.value)  # manifest.json, or the id file it disagrees with
    code, err = _rank_cli(art, capsys)
    assert code == 2 and "Traceback" not in err


def test_onnx_that_only_looks_like_onnx_is_an_artifact_error(art: Path, capsys) -> None:
    """Past the cheap check in Artifact.load (first byte of a ModelProto), onnxruntime
    parses the graph in Ranker: its failure must be an ArtifactError too."""
    (art / "model.onnx").write_bytes(b"\x08\x09garbage that is not a protobuf")
    _rehash(art)
    Artifact.load(art)  # the cheap check passes ...
    with pytest.raises(ArtifactError, match=r"model.onnx"):
        Ranker.load(art)  # ... onnxruntime's parse fails
    code, err = _rank_cli(art, capsys)
    assert code == 2 and "model.onnx" in err and "Traceback" not in err


def test_the_command_line_prints_no_traceback(art: Path) -> None:
    """A real process: exit 2 and one message on stderr for a manifest that is a list and for
    an npz holding an object array."""
    other = art.parent / "other"
    shutil.copytree(art, other)
    _corrupt_manifest(art, "a list")
    _corrupt_file(other, "npz object array")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    for folder, expected in ((art, "manifest.json"), (other, "user_state.npz")):
        proc = subprocess.run(
            [sys.executable, "-m", "training.cli", "rank", "--model", str(folder), "--cart", "1"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr


# -- symlinks ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["items.json", "model.onnx", "user_state.npz"])
def test_a_symlinked_file_is_refused_even_with_a_matching_hash(art: Path, name: str) -> None:
    outside = art.parent / f"outside-{name}"
    shutil.move(art / name, outside)
    (art / name).symlink_to(outside)  # same bytes: the sha256 matches
    with pytest.raises(ArtifactError, match="symbolic link") as caught:
        Artifact.load(art)
    assert name in str(caught.value)


def test_a_symlink_to_etc_passwd_is_never_read(art: Path, monkeypatch) -> None:
    target = Path("/etc/passwd")
    (art / "items.json").unlink()
    (art / "items.json").symlink_to(target)
    manifest = _manifest(art)
    manifest["files"]["items.json"] = hashlib.sha256(target.read_bytes()).hexdigest()
    _write_manifest(art, manifest)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        artifact_module.os, "open", lambda p, *a: opened.append(str(p)) or real_open(p, *a)
    )
    with pytest.raises(ArtifactError, match=r"items.json: is a symbolic link"):
        Artifact.load(art)
    assert not any(p.endswith("items.json") for p in opened)


def test_a_symlinked_manifest_is_refused(art: Path) -> None:
    outside = art.parent / "manifest-elsewhere.json"
    shutil.move(art / "manifest.json", outside)
    (art / "manifest.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"manifest.json: is a symbolic link"):
        Artifact.load(art)


def test_the_artifact_folder_may_be_a_symlink(art: Path) -> None:
    """The registry cache points ``current`` at a version folder: that must keep working."""
    current = art.parent / "current"
    current.symlink_to(art, target_is_directory=True)
    assert Ranker.load(current).rank(cart=[1], k=2).items


def test_a_fifo_named_in_the_manifest_is_refused_without_blocking(art: Path) -> None:
    os.mkfifo(art / "extra.bin")
    manifest = _manifest(art)
    manifest["files"]["extra.bin"] = "0" * 64
    _write_manifest(art, manifest)
    with pytest.raises(ArtifactError, match=r"extra.bin: expected a regular file"):
        Artifact.load(art)


@pytest.mark.parametrize("name", ["model.onnx", "manifest.json"])
def test_a_directory_where_an_artifact_file_belongs_is_refused_naming_it(art: Path, name) -> None:
    (art / name).unlink()
    (art / name).mkdir()
    with pytest.raises(ArtifactError, match=rf"{name}: expected a regular file"):
        Artifact.load(art)


def test_files_not_in_the_manifest_are_ignored_and_not_read(art: Path, monkeypatch) -> None:
    (art / "notes.txt").symlink_to("/etc/passwd")
    (art / "dangling").symlink_to(art / "nowhere")
    (art / "sub").mkdir()
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        artifact_module.os, "open", lambda p, *a: opened.append(Path(p).name) or real_open(p, *a)
    )
    Artifact.load(art)
    assert sorted(opened) == sorted(["manifest.json", *_manifest(art)["files"]])


# -- signatures ----------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(private, public, another public key)."""
    folder = tmp_path / "keys"
    generate_keypair(folder / "k.pem", folder / "k.pub")
    generate_keypair(folder / "other.pem", folder / "other.pub")
    return folder / "k.pem", folder / "k.pub", folder / "other.pub"


def test_generate_keypair_is_private_and_never_overwrites(tmp_path: Path, capsys) -> None:
    private, public = tmp_path / "k" / "signing.pem", tmp_path / "k" / "signing.pub"
    assert main(["keygen", "--private", str(private), "--public", str(public)]) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes(), public.read_bytes()
    capsys.readouterr()
    for argv in (
        ["--private", str(private), "--public", str(tmp_path / "new.pub")],
        ["--private", str(tmp_path / "new.pem"), "--public", str(public)],
    ):
        assert main(["keygen", *argv]) == 2
        assert "refusing to overwrite" in capsys.readouterr().err
    assert (private.read_bytes(), public.read_bytes()) == before
    assert not (tmp_path / "new.pem").exists() and not (tmp_path / "new.pub").exists()
    assert not [p for p in (tmp_path / "k").iterdir() if p.name.startswith(".")]  # no temp files


def test_a_signed_artifact_loads_with_its_key(art: Path, keys) -> None:
    private, public, other = keys
    sig = sign_artifact(art, private)
    assert sig == art / "manifest.sig" and len(base64.b64decode(sig.read_bytes())) == 64
    verify_artifact(art, [public])
    assert Artifact.load(art, trusted_keys=[public]).manifest["n_items"] == 5
    assert Artifact.load(art, trusted_keys=[str(other), str(public)])  # any one key
    assert Artifact.load(art)  # no trusted keys: the signature is not required (nor read)


def test_signature_failures_are_artifact_errors(art: Path, keys) -> None:
    private, public, other = keys
    with pytest.raises(SigningError, match="not signed"):
        Artifact.load(art, trusted_keys=[public])
    sign_artifact(art, private)
    with pytest.raises(SigningError, match=r"does not match manifest.json with any trusted key"):
        Artifact.load(art, trusted_keys=[other])
    with pytest.raises(SigningError, match="no trusted public key"):
        Artifact.load(art, trusted_keys=[])
    with pytest.raises(SigningError, match=r"nokey.pub: cannot read the public key"):
        Artifact.load(art, trusted_keys=[public.parent / "nokey.pub"])
    with pytest.raises(SigningError, match=r"k.pem: expected a PEM Ed25519 public key"):
        Artifact.load(art, trusted_keys=[private])  # the private key given by mistake
    good = (art / "manifest.sig").read_bytes()
    (art / "manifest.sig").write_bytes(good[:40])  # truncated
    with pytest.raises(SigningError, match=r"manifest.sig: not an Ed25519 signature"):
        Artifact.load(art, trusted_keys=[public])
    (art / "manifest.sig").unlink()
    (art / "manifest.sig").symlink_to(art.parent / "elsewhere.sig")
    (art.parent / "elsewhere.sig").write_bytes(good)
    with pytest.raises(ArtifactError, match=r"manifest.sig: is a symbolic link"):
        Artifact.load(art, trusted_keys=[public])
    (art / "manifest.sig").unlink()
    (art / "manifest.sig").write_bytes(good)
    Artifact.load(art, trusted_keys=[public])
    # The manifest edited after signing (with every file hash still right): refused.
    manifest = _manifest(art)
    manifest["metrics"] = {"recall@10": 0.99}
    _write_manifest(art, manifest)
    Artifact.load(art)  # consistent, so only the signature can tell
    with pytest.raises(SigningError, match="changed after signing"):
        Artifact.load(art, trusted_keys=[public])


def test_a_file_changed_after_signing_is_refused(art: Path, keys) -> None:
    """The signature covers the manifest, the manifest every file: the whole artifact."""
    private, public, _ = keys
    sign_artifact(art, private)
    table = json.loads((art / "item_table.json").read_text())
    table["price"][0] = 0.01
    (art / "item_table.json").write_text(json.dumps(table))
    with pytest.raises(ArtifactError, match=r"item_table.json: sha256 does not match"):
        Artifact.load(art, trusted_keys=[public])


def test_the_signature_is_checked_before_any_other_file_is_read(
    art: Path, keys, monkeypatch
) -> None:
    private, _, other = keys
    sign_artifact(art, private)
    (art / "items.json").write_bytes(b"corrupt")  # would be a hash error if it were read
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        artifact_module.os, "open", lambda p, *a: opened.append(Path(p).name) or real_open(p, *a)
    )
    with pytest.raises(SigningError, match="does not match"):
        Artifact.load(art, trusted_keys=[other])
    assert opened == ["manifest.json", "manifest.sig"]


def test_signing_refuses_bad_private_keys(art: Path, keys, tmp_path: Path) -> None:
    _, public, _ = keys
    with pytest.raises(SigningError, match=r"k.pub: expected a PEM Ed25519 private key"):
        sign_artifact(art, public)
    with pytest.raises(SigningError, match=r"missing.pem: cannot read the private key"):
        sign_artifact(art, tmp_path / "missing.pem")
    assert not (art / "manifest.sig").exists()


def test_keygen_train_export_signed_then_load(tmp_path: Path, capsys) -> None:
    """End to end: ``addons keygen`` -> ``addons train --export --sign-key`` -> only the
    right key loads the artifact, through Artifact.load and Ranker.load."""
    from tests.test_hardening_training import _config, _write_shop

    data = tmp_path / "data"
    data.mkdir()
    _write_shop(data)
    config = _config(data, "cooccurrence")
    keys = tmp_path / "keys"
    assert main(["keygen", "--private", str(keys / "k.pem"), "--public", str(keys / "k.pub")]) == 0
    generate_keypair(keys / "other.pem", keys / "other.pub")
    out = tmp_path / "artifacts" / "signed"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--quiet",
                "--export",
                str(out),
                "--sign-key",
                str(keys / "k.pem"),
            ]
        )
        == 0
    )
    assert (out / "manifest.sig").is_file()
    ranker = Ranker.load(out, trusted_keys=[keys / "k.pub"])
    assert ranker.rank(user_id="u1", k=3).items
    with pytest.raises(ArtifactError, match="any trusted key"):
        Ranker.load(out, trusted_keys=[keys / "other.pub"])
    unsigned = tmp_path / "unsigned"
    shutil.copytree(out, unsigned)
    (unsigned / "manifest.sig").unlink()
    with pytest.raises(ArtifactError, match="not signed"):
        Artifact.load(unsigned, trusted_keys=[keys / "k.pub"])
    assert Artifact.load(unsigned)  # without trusted keys a signature is not required
    # The command line: the right key ranks; unsigned or another key is exit 2, no traceback.
    assert (
        main(["rank", "--model", str(out), "--user", "u1", "--trust-key", str(keys / "k.pub")]) == 0
    )
    capsys.readouterr()
    for folder, key in ((unsigned, "k.pub"), (out, "other.pub")):
        assert main(["rank", "--model", str(folder), "--trust-key", str(keys / key)]) == 2
        err = capsys.readouterr().err
        assert "manifest.sig" in err and "Traceback" not in err
