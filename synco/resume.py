"""Whether a saved run may be continued under the current settings: one comparison for every resumable job.

A job names the settings that change nothing in its numbers (``free``: devices, workers, logging cadence);
every other setting must be the same as when the run was saved, or the resumed run would not end where an
uninterrupted one does.
"""

from __future__ import annotations

from typing import Any, Collection, NamedTuple

# Config keys a resumed pretraining run may change: they change nothing in its training (devices, workers, logging
# and checkpoint cadence, the end-of-run evaluation, where the data lives, and the per-process batch as long as the
# global batch stays, which the trainer checks).
RESUMABLE_CHANGES = frozenset({"resume", "log_every", "ckpt_every_steps", "ckpt_every_minutes", "threads", "device",
                               "compile", "data.num_workers", "knn", "knn_at_end", "knn_every", "data.root",
                               "optim.batch_size"})
# Of those, the ones that change nothing in a finished run's results either (summary.json: its k-NN numbers come
# from the evaluation settings and the data; a sweep reuses a finished run made with other values of these only).
RESULT_INVARIANT_KEYS = RESUMABLE_CHANGES - {"knn", "knn_at_end", "knn_every", "data.root", "optim.batch_size"}

# Values compared whole, never split into dotted keys: their keys are timm's constructor arguments, not
# settings of ours, and a kwarg that appears or disappears is itself a difference.
OPAQUE_KEYS = frozenset({"backbone_kwargs"})


class Difference(NamedTuple):
    key: str  # dotted, e.g. "optim.lr"
    saved: Any  # None when the saved settings lack the key
    current: Any  # None when the current settings lack the key


def flatten(settings: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; the values under :data:`OPAQUE_KEYS` stay whole."""
    out = {}
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in OPAQUE_KEYS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_free(key: str, free: Collection[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in free for i in range(1, len(parts) + 1))


def config_differences(saved: dict, current: dict, free: Collection[str] = ()) -> list[Difference]:
    """The settings, by dotted key in sorted order, whose values differ between ``saved`` and ``current``.

    Args:
        saved: the settings stored with the run (nested dicts allowed).
        current: the settings of this process, in the same shape.
        free: dotted keys that may differ; a free section (``"knn"``) frees every key below it.

    Returns:
        One :class:`Difference` per differing key; empty when the run may be resumed.
    """
    a, b = flatten(saved), flatten(current)
    return [Difference(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b))
            if not _is_free(key, free) and a.get(key) != b.get(key)]
