"""The bookkeeping of a folder `synco synth-data generate` (generate.py) fills: ``generation.json`` (its settings),
``manifest.jsonl`` (one entry per image), and what a killed run leaves: temp files, images the manifest does not
list yet. Nothing here samples an image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import SyncoError
from ..io import atomic_write_text, remove_stale_temps
from .model import image_seed

MANIFEST = "manifest.jsonl"
SETTINGS = "generation.json"
# Settings that must match when resuming into an existing output directory.
IDENTITY_KEYS = ("model", "sampler", "steps", "guidance", "seed", "resolution", "format")
# The settings every manifest entry carries: the images of one folder may come from several runs.
ENTRY_SETTINGS = ("model", "sampler", "steps", "guidance", "resolution")


def image_name(index: int, fmt: str) -> str:
    return f"{index:05d}.{fmt}"


def _damaged(path: Path, why: str, fix: str) -> SyncoError:
    return SyncoError(f"'{path}' is damaged ({why}): the settings of the images already in '{path.parent}' cannot "
                      f"be checked, and images made with other settings would be mixed in unseen. {fix}")


def read_manifest(path: Path) -> list[dict]:
    """The manifest's entries; a line cut short by a kill (not JSON) is skipped, but a line that is JSON and not
    an entry means the file was damaged or replaced, and is refused rather than rewritten as if consistent."""
    entries = []
    if not path.is_file():
        return entries
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and entry["file"].count("/") == 1
                and not entry["file"].startswith(("/", "."))):
            raise _damaged(path, f"line {n} is not an entry of the form {{\"file\": \"<class>/<image>\", ...}}",
                           "Delete it to have it rebuilt from the images present, or use a new --out.")
        entries.append(entry)
    return entries


def _recorded_settings(path: Path) -> Optional[dict]:
    """generation.json's settings, None when there is none; a damaged one is refused (reading it as empty
    would switch the settings check off)."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, f"not JSON: {e.__class__.__name__}", _SETTINGS_FIX) from None
    if not isinstance(old, dict):
        raise _damaged(path, f"a JSON {type(old).__name__}, not an object", _SETTINGS_FIX)
    return old


_SETTINGS_FIX = ("Restore it, or delete it: the images are then checked against manifest.jsonl, whose entries carry "
                 "the settings that made each of them.")


def _manifest_differences(entries: list[dict], settings: dict, seed: int, fmt: str) -> dict:
    """key -> (recorded, now) for the settings manifest entries were made with that differ from ``settings``."""
    diff = {}
    for e in entries:
        for k in ENTRY_SETTINGS:
            if k in e and e[k] != settings[k]:
                diff.setdefault(k, (e[k], settings[k]))
        if all(k in e for k in ("seed", "class", "index")) and e["seed"] != image_seed(seed, str(e["class"]),
                                                                                      e["index"]):
            diff.setdefault("seed", ("another base seed", seed))
        if Path(e["file"]).suffix[1:] != fmt:
            diff.setdefault("format", (Path(e["file"]).suffix[1:], fmt))
    return diff


def check_settings(out: Path, settings: dict, names: list[str], entries: list[dict], seed: int) -> list[str]:
    """Refuse to add to ``out`` with other settings than its images were made with (generation.json and every
    manifest entry); returns every class the folder then holds."""
    old = _recorded_settings(out / SETTINGS)
    diff = {k: (old[k], settings[k]) for k in IDENTITY_KEYS if old is not None and k in old and old[k] != settings[k]}
    for k, v in _manifest_differences(entries, settings, seed, settings["format"]).items():
        diff.setdefault(k, v)
    if diff:
        raise SyncoError(f"'{out}' already holds images generated with other settings ("
                         + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                         + "). Use the same settings to resume or extend it, or a new --out.")
    classes = old.get("classes", []) if old is not None else []
    listed = [str(c) for c in classes] if isinstance(classes, list) else []
    return list(dict.fromkeys([*listed, *(str(e.get("class")) for e in entries if "class" in e), *names]))


def remove_temp_files(out: Path, classes: list[str]) -> int:
    """Temp files of writers that are gone (killed mid-write); a live writer's (another generate on the same
    folder) is left alone."""
    return sum(len(remove_stale_temps(d)) for d in (out, *(out / c for c in classes)))


def manifest_entry(settings: dict, cls: str, class_id: int, index: int) -> dict:
    """The manifest line of image ``index`` of class ``cls``: its file, ids and seed, and the settings that made it."""
    return {"file": f"{cls}/{image_name(index, settings['format'])}", "class": cls, "class_id": class_id,
            "index": index, "seed": image_seed(settings["seed"], cls, index),
            **{k: settings[k] for k in ENTRY_SETTINGS}}


def write_settings(out: Path, settings: dict, classes: list[str], per_class: int, status: str,
                   last_run: Optional[dict] = None) -> None:
    record = {**settings, "classes": classes, "per_class": per_class, "status": status}
    if last_run is not None:
        record["last_run"] = last_run
    atomic_write_text(json.dumps(record, indent=2) + "\n", out / SETTINGS)


@dataclass
class FolderPlan:
    """What a run has left to do in its folder, once the folder is consistent."""

    pending: list  # (class, index) still to generate, index-major: a partial run is balanced across classes
    skipped: int  # images already there
    classes: list  # every class the folder holds, this run's and earlier runs'
    removed: int  # temp files of writers that are gone


def prepare_folder(out: Path, settings: dict, names: list[str], ids: dict[str, int], per_class: int) -> FolderPlan:
    """Check ``out`` against ``settings``, create the class folders, remove dead writers' temp files, reconcile the
    manifest with the images present, and record the run as running."""
    recorded = read_manifest(out / MANIFEST)
    classes = check_settings(out, settings, names, recorded, settings["seed"])
    out.mkdir(parents=True, exist_ok=True)
    for c in names:
        (out / c).mkdir(exist_ok=True)
    removed = remove_temp_files(out, names)
    kept, pending, skipped = _reconcile(out, recorded, settings, names, ids, per_class)
    atomic_write_text("".join(json.dumps(e) + "\n" for e in kept.values()), out / MANIFEST)
    write_settings(out, settings, classes, per_class, "running")
    return FolderPlan(pending, skipped, classes, removed)


def _reconcile(out: Path, recorded: list[dict], settings: dict, names: list[str], ids: dict[str, int],
               per_class: int) -> tuple[dict, list, int]:
    """(entries kept, by file; (class, index) still missing; images already there). Entries whose file is gone or
    listed twice are dropped; files written just before a kill get their entry (their seed follows from the
    settings, which check_settings compared)."""
    kept: dict[str, dict] = {}
    for e in recorded:
        if e["file"] not in kept and (out / e["file"]).is_file():
            kept[e["file"]] = e
    pending, skipped = [], 0
    for i in range(per_class):  # index-major: a partial run is balanced across classes
        for c in names:
            f = f"{c}/{image_name(i, settings['format'])}"
            if (out / f).is_file():
                skipped += 1
                kept.setdefault(f, manifest_entry(settings, c, ids[c], i))
            else:
                pending.append((c, i))
    return kept, pending, skipped
