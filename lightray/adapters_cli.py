"""``adapters`` sub-commands: list / show / push / delete / fetch / gc on a registry.

Meant to be mounted into the main ``lightray`` CLI::

    from lightray.adapters_cli import add_adapter_commands
    add_adapter_commands(subparsers)      # subparsers = parser.add_subparsers(...)
    args = parser.parse_args()
    sys.exit(args.func(args))             # every leaf sets func(args) -> exit code

and runnable on its own: ``python -m lightray.adapters_cli adapters list``.

The registry location comes from ``--registry``, else ``$LIGHTRAY_REGISTRY``,
else ``./registry``; a relative folder is taken from the repository root, as
the service takes it (``lightray.registry_settings``).  Backend options (S3
endpoint, keys) come from ``--storage-options JSON`` or
``$LIGHTRAY_REGISTRY_STORAGE_OPTIONS`` (prefer the environment for secrets:
argv is visible to other users via ``ps``).  For S3 the usual ``AWS_*``
variables, including ``AWS_ENDPOINT_URL``, also work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lightray.models import FAMILIES
from lightray.registry import AdapterManifest, AdapterRef, AdapterRegistry, AdapterRegistryError
from lightray.registry_settings import ENV_REGISTRY, ENV_STORAGE_OPTIONS, open_registry

__all__ = ["add_adapter_commands", "main", "registry_from_args"]


def _json_arg(text: str) -> Any:
    """argparse type: inline JSON, or ``@path`` to read JSON from a file."""
    try:
        if text.startswith("@"):
            with open(text[1:]) as f:
                return json.load(f)
        return json.loads(text)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None


def _json_object_arg(text: str) -> dict[str, Any]:
    value = _json_arg(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object: {text!r}")
    return value


def _common_parent() -> argparse.ArgumentParser:
    """Options every leaf command accepts (so they work after the sub-command name)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--registry",
        default=None,
        help=f"registry root: folder (relative: to the repository root) or s3://bucket/prefix "
             f"(default: ${ENV_REGISTRY} or ./registry)",
    )
    p.add_argument(
        "--storage-options",
        type=_json_object_arg,
        default=None,
        metavar="JSON",
        help=f"fsspec storage options as JSON or @file (default: ${ENV_STORAGE_OPTIONS})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return p


def registry_from_args(args: argparse.Namespace) -> AdapterRegistry:
    """The registry an invocation points at: flags, then environment, then default (`RegistrySettings`)."""
    return open_registry(args.registry, args.storage_options)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _manifest_json(m: AdapterManifest) -> dict[str, Any]:
    return {"ref": m.ref, **m.model_dump(mode="json")}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [header, *rows])


# ---- command handlers: each returns a process exit code


def _cmd_list(args: argparse.Namespace) -> int:
    reg = registry_from_args(args)
    manifests = reg.manifests(args.tenant, latest_only=args.latest)
    if args.json:
        _dump([_manifest_json(m) for m in manifests])
        return 0
    if not manifests:
        print("no adapters")
        return 0
    rows = [
        [
            m.ref,
            m.base_model_id,
            "" if m.rank is None else str(m.rank),
            m.visibility,
            m.created_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            ", ".join(m.trigger_words),
        ]
        for m in manifests
    ]
    print(_table(rows, ["REF", "BASE MODEL", "RANK", "VISIBILITY", "CREATED (UTC)", "TRIGGERS"]))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    m = registry_from_args(args).resolve(args.ref)
    _dump(_manifest_json(m))  # JSON is the readable form of a nested manifest
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    ref = AdapterRef.parse(args.ref)
    fields: dict[str, Any] = {}
    if args.base_model_id is not None:
        fields["base_model_id"] = args.base_model_id
    if args.base_fingerprint is not None:
        fields["base_fingerprint"] = args.base_fingerprint
    if args.base_family is not None:
        fields["base_family"] = args.base_family
    if args.trigger_words:
        fields["trigger_words"] = args.trigger_words
    if args.dataset_hash is not None:
        fields["dataset_hash"] = args.dataset_hash
    if args.training_config is not None:
        fields["training_config"] = args.training_config
    if args.metrics is not None:
        fields["metrics"] = args.metrics
    if args.public:
        fields["visibility"] = "public"
    m = registry_from_args(args).publish(
        ref.tenant, ref.name, args.dir, version=ref.version, **fields
    )
    if args.json:
        _dump(_manifest_json(m))
    else:
        print(f"published {m.ref} ({len(m.files)} files, base {m.base_model_id})")
    return 0


def _cmd_delete(args: argparse.Namespace) -> int:
    deleted = registry_from_args(args).delete(args.ref)
    if args.json:
        _dump({"deleted": deleted})
    else:
        for ref in deleted:
            print(f"deleted {ref}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    m, path = registry_from_args(args).fetch(args.ref, args.dest)
    if args.json:
        _dump({"ref": m.ref, "path": str(path)})
    else:
        print(path)
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    removed = registry_from_args(args).gc_incomplete(args.older_than)
    if args.json:
        _dump({"removed": removed})
    else:
        print("\n".join(f"removed {r}" for r in removed) or "nothing to remove")
    return 0


def add_adapter_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``adapters`` command group to an ``add_subparsers()`` object.

    Each leaf sets ``func`` (``args.func(args) -> int``), which already maps
    registry errors to a message on stderr and exit code 1.
    """
    common = _common_parent()
    adapters = subparsers.add_parser(
        "adapters", help="manage LoRA adapters in the registry", description=__doc__.split("\n\n")[0]
    )
    sub = adapters.add_subparsers(dest="adapters_command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", parents=[common], help="list adapter versions")
    p.add_argument("--tenant", default=None, help="only this tenant")
    p.add_argument("--latest", action="store_true", help="only the latest version of each adapter")
    p.set_defaults(func=_guard(_cmd_list))

    p = sub.add_parser("show", parents=[common], help="print one manifest (REF: tenant/name[@vN])")
    p.add_argument("ref")
    p.set_defaults(func=_guard(_cmd_show))

    p = sub.add_parser("push", parents=[common], help="publish DIR as the next version of TENANT/NAME")
    p.add_argument("ref", metavar="TENANT/NAME", help="append @vN to pin the version (mirroring)")
    p.add_argument("dir", metavar="DIR", help="folder with adapter_model.safetensors + adapter_config.json")
    p.add_argument("--base-model-id", default=None, help="default: base_model_name_or_path from adapter_config.json")
    p.add_argument("--base-fingerprint", default=None)
    p.add_argument("--base-family", default=None, choices=sorted(FAMILIES),
                   help="the base's model family (a server of another family refuses the adapter with a 400)")
    p.add_argument("--trigger-word", dest="trigger_words", action="append", default=[], help="repeatable")
    p.add_argument("--dataset-hash", default=None)
    p.add_argument("--training-config", type=_json_object_arg, default=None, metavar="JSON")
    p.add_argument("--metrics", type=_json_object_arg, default=None, metavar="JSON")
    p.add_argument("--public", action="store_true", help="visibility=public (default private)")
    p.set_defaults(func=_guard(_cmd_push))

    p = sub.add_parser("delete", parents=[common], help="delete one version (t/n@vN) or all (t/n)")
    p.add_argument("ref")
    p.set_defaults(func=_guard(_cmd_delete))

    p = sub.add_parser("fetch", parents=[common], help="download and verify; print the local dir")
    p.add_argument("ref")
    p.add_argument("--dest", default=None, help="target dir (default: the local adapter cache)")
    p.set_defaults(func=_guard(_cmd_fetch))

    p = sub.add_parser("gc", parents=[common], help="remove incomplete (manifest-less) versions")
    p.add_argument("--older-than", type=float, default=3600.0, metavar="SECONDS")
    p.set_defaults(func=_guard(_cmd_gc))
    return adapters


def _guard(fn: Any) -> Any:
    """Turn expected failures into one stderr line + exit 1 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (AdapterRegistryError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m lightray.adapters_cli adapters ...``."""
    parser = argparse.ArgumentParser(prog="lightray")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_adapter_commands(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `... | head`: stop quietly, like other CLIs
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
