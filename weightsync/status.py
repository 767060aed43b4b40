"""`weightsync status`: what is on a volume — models, revisions, current, sizes, staging, lock holders.

Read-only: works on a read-only mount, takes no lock, never changes anything.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from weightsync.checksums import describe_tally, tally
from weightsync.fsutil import disk_usage
from weightsync.layout import ModelVolume, require_volume, volumes
from weightsync.locking import flock_held
from weightsync.logs import human_bytes, human_duration
from weightsync.manifest import Manifest, ManifestError


def model_status(volume: ModelVolume) -> dict[str, Any]:
    current = volume.current_revision()
    revisions = []
    for revision in volume.revisions():
        entry: dict[str, Any] = {"revision": revision, "current": revision == current,
                                 "path": str(volume.revision_dir(revision))}
        try:
            manifest = Manifest.load(volume.manifest_path(revision))
            entry.update(files=len(manifest.files), bytes=manifest.total_bytes, source=manifest.source,
                         published=manifest.created, evidence=tally(f.evidence for f in manifest.files),
                         signature=manifest.signature.to_json() if manifest.signature else None)
            if manifest.sources:  # synced with --fallback: the primary asked for, and whether this came from it
                entry.update(primary=manifest.bound_to[0], from_fallback=manifest.source != manifest.bound_to[0])
        except ManifestError as exc:
            entry["problem"] = str(exc)
        try:
            entry["last_verified"] = float(volume.verified_path(revision).read_text())
        except (OSError, ValueError):
            entry["last_verified"] = None
        revisions.append(entry)
    staging = []
    for directory in sorted(volume.staging_root.glob("*")):
        if directory.is_dir() and not directory.is_symlink():
            staging.append({"revision": directory.name, "bytes_on_disk": disk_usage(directory),
                            "age_seconds": round(time.time() - directory.stat().st_mtime)})
    locks = []
    for lock in sorted(volume.locks_dir.glob("*.lock")):
        held = flock_held(lock)
        holder = None
        if held:
            try:
                holder = json.loads(lock.with_name(lock.name + ".holder").read_text())
            except (OSError, ValueError):
                holder = None
        if held:
            locks.append({"revision": lock.name[: -len(".lock")], "holder": holder})
    return {"name": volume.label, "current": current, "revisions": revisions, "staging": staging,
            "lock_holders": locks}


def volume_status(dest: Path) -> dict[str, Any]:
    require_volume(dest)
    models = []
    for volume in volumes(dest):
        try:
            models.append(model_status(volume))
        except Exception as exc:  # one odd directory must not hide the others
            models.append({"name": volume.label, "problem": str(exc)})
    return {"dest": str(dest.absolute()), "models": models}


def format_table(report: dict[str, Any]) -> str:
    now = time.time()
    lines = [f"volume {report['dest']}"]
    if not report["models"]:
        lines.append("  no models")
    for model in report["models"]:
        sources = {rev.get("source") for rev in model.get("revisions", []) if rev.get("current")}
        source = next(iter(sources - {None}), None)
        lines.append(f"model {model['name']}  (current: {model.get('current') or '-'}"
                     + (f", from {source}" if source else "") + ")")
        lines.append(f"  {'':2}{'REVISION':<42} {'FILES':>6} {'SIZE':>10}  {'PUBLISHED':<12} {'VERIFIED':<12}")
        for rev in model.get("revisions", []):
            mark = "*" if rev["current"] else " "
            published = human_duration(now - rev["published"]) + " ago" if rev.get("published") else "-"
            verified = human_duration(now - rev["last_verified"]) + " ago" if rev.get("last_verified") else "never"
            if "problem" in rev:
                lines.append(f"  {mark} {rev['revision']:<42} damaged: {rev['problem']}")
                continue
            lines.append(f"  {mark} {rev['revision']:<42} {rev['files']:>6} {human_bytes(rev['bytes']):>10}  "
                         f"{published:<12} {verified:<12}")
            lines.append(f"      verified by: {describe_tally(rev['evidence'])}")
            if rev.get("from_fallback"):
                lines.append(f"      from fallback {rev['source']} (primary {rev['primary']})")
            if rev.get("signature"):
                lines.append(f"      signed by: {rev['signature']['signer']} ({rev['signature']['file']})")
        for stage in model.get("staging", []):
            lines.append(f"  staging {stage['revision']}: {human_bytes(stage['bytes_on_disk'])} on disk, "
                         f"idle {human_duration(stage['age_seconds'])}")
        for lock in model.get("lock_holders", []):
            holder = lock["holder"] or {}
            lines.append(f"  locked {lock['revision']}: host {holder.get('host', '?')} pid {holder.get('pid', '?')}")
    return "\n".join(lines)
