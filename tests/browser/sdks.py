"""The browser SDKs, installed with npm from the committed ``package.json`` and
``package-lock.json`` into a folder of the pytest cache, once per version.

A missing npm is a failure, never a skip: these tests are how we know the SDKs work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
MANIFESTS = ("package.json", "package-lock.json")
INSTALL_SECONDS = 300
SEGMENT_UMD = "@segment/analytics-next/dist/umd"
RUDDERSTACK_UMD = "@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js"


def pinned_versions() -> dict[str, str]:
    """The exact versions ``package.json`` pins, by package name."""
    return json.loads((HERE / "package.json").read_text(encoding="utf-8"))["dependencies"]


def _installed_version(node_modules: Path, name: str) -> str | None:
    manifest = node_modules / name / "package.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text(encoding="utf-8")).get("version")


def _up_to_date(folder: Path) -> bool:
    if any(not (folder / name).is_file() or (folder / name).read_bytes() != (HERE / name).read_bytes()
           for name in MANIFESTS):
        return False
    return all(_installed_version(folder / "node_modules", name) == version
               for name, version in pinned_versions().items())


def install_sdks(folder: Path) -> Path:
    """Install the pinned SDKs under ``folder`` (skipped when already there); its node_modules."""
    if not _up_to_date(folder):
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            raise RuntimeError("the browser tests need node and npm on PATH (apt-get install nodejs npm)")
        for name in MANIFESTS:
            shutil.copyfile(HERE / name, folder / name)
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                              cwd=folder, capture_output=True, text=True, timeout=INSTALL_SECONDS)
        if done.returncode != 0 or not _up_to_date(folder):
            raise RuntimeError(f"npm ci in {folder} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return folder / "node_modules"


def copy_segment_bundle(node_modules: Path, target: Path) -> Path:
    """What ``[receiver] browser_sdk_dir`` holds: analytics-next's ``dist/umd`` files
    (standalone.js and its ``*.bundle.*.js`` chunks), as the example site's README copies them."""
    shutil.copytree(node_modules / SEGMENT_UMD, target, dirs_exist_ok=True)
    return target
