"""``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``) for the commands that serve a model.

Serving never imports mlflow, so the registry is resolved here, on the command side: the
version's artifact is downloaded once to ``<cache>/<NAME>/v<VERSION>`` (written as a temp
folder, then renamed: see :func:`features.io.atomic_directory`) and a symlink
``<cache>/<NAME>/current`` is switched to it atomically. ``addons serve`` serves ``current``;
:class:`AliasWatcher` moves it when the alias moves, and the server's own artifact watcher
then hot-reloads (a new manifest appears behind the same path).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

from features.errors import ConfigError
from features.io import atomic_directory

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of a ``models:/`` URI."""
    m = _URI.match(uri)
    if not m:
        raise ConfigError(
            "--model", f"expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}"
        )
    return m["name"], m["alias"], m["version"]


def _version(client, name: str, alias: str | None, version: str | None):
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(
            "--model",
            f"registry has no models:/{name}{'@' + alias if alias else '/' + str(version)}: {exc.message}",
        ) from None


def resolve(uri: str, cache: str | Path, tracking_uri: str | None = None) -> Path:
    """Download the version behind ``uri`` (once) and point ``<cache>/<NAME>/current`` at it."""
    import mlflow

    from training.tracking import connect, resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    name, alias, version = parse(uri)
    tracking = resolve_tracking_uri(tracking_uri)
    client = connect(tracking)
    mv = _version(client, name, alias, version)
    folder = Path(cache) / name
    target = folder / f"v{mv.version}"
    if not (target / "manifest.json").is_file():
        try:
            with atomic_directory(target, "manifest.json") as tmp:
                download = tmp / ".download"  # inside the temp folder: removed with it
                local = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=mv.source, dst_path=str(download), tracking_uri=tracking
                    )
                )
                for child in local.iterdir():
                    child.rename(tmp / child.name)
                shutil.rmtree(download)
        except FileExistsError as exc:
            raise ConfigError("--cache", str(exc)) from None
    current = folder / "current"
    link = folder / f".current.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(target.name)
    os.replace(link, current)  # atomic: a reader sees the old or the new version, never none
    return current


class AliasWatcher:
    """Re-resolves a ``models:/NAME@ALIAS`` URI every ``interval`` seconds."""

    def __init__(self, uri: str, cache: str | Path, tracking_uri: str | None = None) -> None:
        self.uri, self.cache, self.tracking_uri = uri, cache, tracking_uri
        self._stop = threading.Event()

    def check(self) -> Path:
        return resolve(self.uri, self.cache, self.tracking_uri)

    def start(self, interval: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except Exception as exc:  # the registry may be briefly unreachable: keep serving
                    print(f"registry check failed: {exc}", flush=True)

        threading.Thread(target=loop, name="alias-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
