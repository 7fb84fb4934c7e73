"""Every name grammar of the store, once: store names, job ids, checkpoint and snapshot
references, ``tinker://`` paths, and the hosted resource names of checkpoints and models.

========================================  ==================================================
``step-10``, ``k3x9...`` (16 chars)       a store name (:func:`validate_name`), a job id
``cross_job://<job>/<name>``, ``job:name``  a train state (:func:`parse_checkpoint_ref`)
``sampler://<job>/<snapshot>``            a sampler snapshot (:func:`parse_snapshot_identity`)
``tinker://<job>/weights/<name>``         Tinker's train state path (:func:`parse_tinker_path`)
``tinker://<job>/sampler_weights/<name>`` Tinker's sampler path
``accounts/<a>/rlorTrainerJobs/<job>/``   a checkpoint's resource name
``checkpoints/<id>``                      (:func:`parse_checkpoint_resource_name`)
``accounts/<a>/models/<id>``              a promoted model (:func:`parse_model_name`;
                                          ids: :func:`validate_output_model_id`)
========================================  ==================================================

Store names become directory names, so every parser validates the segments it returns:
``..``, ``/`` and the like never get through.
"""

from __future__ import annotations

import re
import secrets
import string
from typing import Literal

__all__ = [
    "CROSS_JOB_SCHEME", "MAX_MODEL_ID_LENGTH", "SAMPLER_SCHEME", "TINKER_SCHEME",
    "checkpoint_resource_name", "make_cross_job_ref", "make_snapshot_identity",
    "make_tinker_path", "model_resource_name", "new_job_id", "parse_checkpoint_ref",
    "parse_checkpoint_resource_name", "parse_model_name", "parse_snapshot_identity",
    "parse_tinker_path", "validate_name", "validate_output_model_id",
]

CROSS_JOB_SCHEME = "cross_job://"
"""A train state: ``cross_job://<job_id>/<name>`` (``save_state``'s path)."""
SAMPLER_SCHEME = "sampler://"
"""A sampler snapshot: ``sampler://<job_id>/<snapshot_name>`` (``SaveSamplerResult.path``)."""
TINKER_SCHEME = "tinker://"
"""Tinker's checkpoint paths: ``tinker://<job>/weights/<name>`` (train states) and
``tinker://<job>/sampler_weights/<name>`` (sampler snapshots); accepted wherever ours are."""
MAX_MODEL_ID_LENGTH = 63
"""Longest promoted model id (a DNS label, as the hosted service requires)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_JOB_ID_ALPHABET = string.ascii_lowercase + string.digits
_MODEL_ID_CHARS_RE = re.compile(r"[a-z0-9-]")
_CHECKPOINT_RESOURCE_RE = re.compile(
    r"^accounts/(?P<account>[^/]+)/rlorTrainerJobs/(?P<job_id>[^/]+)"
    r"/checkpoints/(?P<checkpoint_id>[^/]+)$")
_MODEL_RESOURCE_RE = re.compile(r"^accounts/(?P<account>[^/]+)/models/(?P<model_id>[^/]+)$")
_TINKER_KINDS = {"weights": "state", "sampler_weights": "sampler"}


# ------------------------------------------------------------------------------ store names
def validate_name(name: str, what: str = "checkpoint name") -> str:
    """Names become directory names in the store: refuse anything that could escape or collide."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-128 characters of letters, digits, "
                         f"'.', '_' or '-', starting with a letter or digit")
    return name


def new_job_id() -> str:
    """A 16-character lowercase id, shaped like the hosted service's trainer job ids."""
    return "".join(secrets.choice(_JOB_ID_ALPHABET) for _ in range(16))


# ------------------------------------------------------------------------------ tinker paths
def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """``tinker://<job>/<weights|sampler_weights>/<name>`` -> (job, kind, name), kind being
    ``"state"`` or ``"sampler"``.

    Raises:
        ValueError: not of that shape.
    """
    job_id, kind, name = (path[len(TINKER_SCHEME):].split("/", 2) + ["", ""])[:3]
    if not path.startswith(TINKER_SCHEME) or kind not in _TINKER_KINDS or not job_id \
            or not name or "/" in name:
        raise ValueError(f"tinker path {path!r} is malformed: expected "
                         f"'tinker://<run_id>/weights/<name>' (a train state) or "
                         f"'tinker://<run_id>/sampler_weights/<name>' (a sampler snapshot)")
    return validate_name(job_id, "run id"), _TINKER_KINDS[kind], validate_name(name)


def make_tinker_path(job_id: str, kind: str, name: str) -> str:
    """The ``tinker://`` path of a train state (``kind="state"``) or sampler snapshot."""
    return f"{TINKER_SCHEME}{job_id}/{'weights' if kind == 'state' else 'sampler_weights'}/{name}"


# ------------------------------------------------------------------------------ references
def make_cross_job_ref(job_id: str, name: str) -> str:
    """``cross_job://<job_id>/<name>``: a train state."""
    return f"{CROSS_JOB_SCHEME}{job_id}/{name}"


def make_snapshot_identity(job_id: str, snapshot_name: str) -> str:
    """``sampler://<job_id>/<snapshot_name>``: the public identity of a sampler snapshot."""
    return f"{SAMPLER_SCHEME}{job_id}/{snapshot_name}"


_REFERENCES = {
    "state": {
        "scheme": CROSS_JOB_SCHEME, "what": "checkpoint reference",
        "forms": "'job_id:checkpoint_name' or 'cross_job://job_id/checkpoint_name'",
        "wrong_kind": "{ref!r} is a sampler snapshot, not a train state: load_state needs a "
                      "save_state path ('tinker://<run_id>/weights/<name>')"},
    "sampler": {
        "scheme": SAMPLER_SCHEME, "what": "snapshot identity",
        "forms": "SaveSamplerResult.path ('sampler://<job_id>/<snapshot_name>') or "
                 "'<job_id>:<snapshot_name>'",
        "wrong_kind": "{ref!r} is a train state, not a sampler snapshot: sample from a "
                      "save_weights_for_sampler path ('tinker://<run_id>/sampler_weights/"
                      "<name>')"},
}


def parse_reference(ref: str, kind: Literal["state", "sampler"],
                    default_job_id: str | None = None) -> tuple[str, str]:
    """A train state's (``kind="state"``) or sampler snapshot's reference -> (job, name).

    Accepted: the kind's own scheme (``cross_job://job/name``, ``sampler://job/name``), its
    ``tinker://`` path, ``job:name``, and (with ``default_job_id``) a bare ``name``.

    Raises:
        ValueError: another shape, the other kind's ``tinker://`` path, or an empty part.
    """
    forms = _REFERENCES[kind]
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"{forms['what']} {ref!r} is empty or not a string; pass "
                         f"{forms['forms']}")
    if ref.startswith(TINKER_SCHEME):
        job_id, found, name = parse_tinker_path(ref)
        if found != kind:
            raise ValueError(forms["wrong_kind"].format(ref=ref))
    elif ref.startswith(forms["scheme"]):
        job_id, _, name = ref[len(forms["scheme"]):].partition("/")
    elif ":" in ref and "://" not in ref:
        job_id, _, name = ref.partition(":")
    elif "://" not in ref and "/" not in ref and default_job_id is not None:
        job_id, name = default_job_id, ref
    else:
        raise ValueError(f"{forms['what']} {ref!r} names no trainer job: use {forms['forms']}")
    if not job_id or not name:
        raise ValueError(f"{forms['what']} {ref!r} is incomplete: expected {forms['forms']}")
    try:  # both become directory names in the store
        validate_name(job_id, "job id")
        validate_name(name, "checkpoint name" if kind == "state" else "snapshot name")
    except ValueError as e:
        raise ValueError(f"{forms['what']} {ref!r}: {e}") from None
    return job_id, name


def parse_checkpoint_ref(ref: str, default_job_id: str | None = None) -> tuple[str, str]:
    """``cross_job://job/name``, ``tinker://job/weights/name``, ``job:name`` or (with a default
    job) a bare ``name`` -> (job, name) of a train state."""
    return parse_reference(ref, "state", default_job_id)


def parse_snapshot_identity(identity: str, default_job_id: str | None = None) -> tuple[str, str]:
    """``sampler://job/name``, ``tinker://job/sampler_weights/name``, ``job:name`` or (with
    ``default_job_id``) ``name`` -> (job, name) of a sampler snapshot."""
    return parse_reference(identity, "sampler", default_job_id)


# ------------------------------------------------------------------------------ resources
def checkpoint_resource_name(account: str, job_id: str, checkpoint_id: str) -> str:
    """``accounts/<account>/rlorTrainerJobs/<job_id>/checkpoints/<checkpoint_id>``."""
    return f"accounts/{account}/rlorTrainerJobs/{job_id}/checkpoints/{checkpoint_id}"


def parse_checkpoint_resource_name(name: str) -> tuple[str, str, str]:
    """A 4-segment checkpoint name -> ``(account, job_id, checkpoint_id)``.

    Raises ValueError for anything else, including segments that are not valid store names.
    """
    match = _CHECKPOINT_RESOURCE_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"checkpoint name {name!r} is not of the form "
                         f"'accounts/<account>/rlorTrainerJobs/<job_id>/checkpoints/<id>'; "
                         f"take the 'name' field of a list_checkpoints row")
    account, job_id, checkpoint_id = match.group("account", "job_id", "checkpoint_id")
    validate_name(account, "account")
    validate_name(job_id, "job id")
    validate_name(checkpoint_id, "checkpoint id")
    return account, job_id, checkpoint_id


def model_resource_name(account: str, model_id: str) -> str:
    """``accounts/<account>/models/<model_id>``."""
    return f"accounts/{account}/models/{model_id}"


def parse_model_name(name: str) -> tuple[str, str] | None:
    """``accounts/<account>/models/<id>`` -> ``(account, id)``; None for anything else (a
    bare id, a hub id, a path). The segments are not validated here."""
    match = _MODEL_RESOURCE_RE.match(name) if isinstance(name, str) else None
    return match.group("account", "model_id") if match else None


def validate_output_model_id(output_model_id: str) -> list[str]:
    """The problems with ``output_model_id`` as a model id; an empty list means it is valid.

    A model id is 1-63 characters of lowercase letters ``a-z``, digits ``0-9`` and hyphens, and
    neither starts nor ends with a hyphen (the last rule is this registry's, so ids stay valid
    DNS labels). Check an id before training: a promotion that fails on its id wastes the run's
    final save.
    """
    if not isinstance(output_model_id, str):
        return [f"output_model_id must be a string, got {type(output_model_id).__name__}"]
    if not output_model_id:
        return [f"output_model_id is empty; use 1-{MAX_MODEL_ID_LENGTH} characters of a-z, "
                f"0-9 and '-'"]
    problems = []
    if len(output_model_id) > MAX_MODEL_ID_LENGTH:
        problems.append(f"output_model_id {output_model_id!r} is {len(output_model_id)} "
                        f"characters long; the limit is {MAX_MODEL_ID_LENGTH}")
    bad = sorted({c for c in output_model_id if not _MODEL_ID_CHARS_RE.fullmatch(c)})
    if bad:
        hint = " (use lowercase)" if any(c.isupper() for c in bad) else ""
        problems.append(f"output_model_id {output_model_id!r} contains "
                        f"{', '.join(repr(c) for c in bad)}; only lowercase letters a-z, digits "
                        f"0-9 and '-' are allowed{hint}")
    if output_model_id.startswith("-") or output_model_id.endswith("-"):
        problems.append(f"output_model_id {output_model_id!r} starts or ends with '-'; "
                        f"begin and end it with a letter or digit")
    return problems
