"""`lora-gateway merge`: an adapter merged into its base model, written as a standalone model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters.merge import DTYPES
from server.commands.common import add_command, add_out_flag, fail

_DESCRIPTION = """\
Merge a LoRA adapter into its base model with PEFT's merge_and_unload(safe_merge=True), for
static deployment: the output folder is a plain model (safetensors weights, config.json, the
base's generation config, tokenizer and chat template) that any server loads without LoRA
support, `lora-gateway serve --model DIR` included. Under greedy decoding it answers as the
base model with the adapter does.

The base model is loaded in float32, so the addition W + (alpha/r) B A is done in float32 and
cast once to --dtype: about 4 bytes of memory per parameter. Nothing is downloaded.

--adapter is a PEFT adapter folder, or the name of an adapter registered in the gateway's catalog
for this base model: NAME for a shared adapter, TENANT/NAME for a tenant's. Names are looked up
in the catalog and store that `serve` uses (--state-dir, --catalog-url, --store-url and their
LORA_GATEWAY_* variables, as for serve).
"""

_EXAMPLES = """\
examples:
  lora-gateway merge --model ./my-base --adapter ./support-adapter --out ./support-merged
  lora-gateway merge --model ~/.cache/lora-gateway/demo/base --adapter pirate --out ./pirate --dtype bfloat16
"""


def add_merge_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    merge = add_command(
        commands,
        "merge",
        summary="merge an adapter into its base model: a standalone model folder for static deployment",
        description=_DESCRIPTION,
        examples=_EXAMPLES,
    )
    merge.add_argument(
        "--model", required=True, type=Path, metavar="BASE", help="the base model's folder (Llama or Qwen2 family)"
    )
    merge.add_argument(
        "--adapter",
        required=True,
        metavar="DIR_OR_NAME",
        help="a PEFT adapter folder (adapter_config.json + adapter_model.safetensors), or a registered "
        "adapter's name (NAME, or TENANT/NAME)",
    )
    add_out_flag(merge, "the merged model")
    merge.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the written weights; auto keeps the one the base model was saved in [default: auto]",
    )
    merge.add_argument(
        "--threads", type=int, metavar="N", help="CPU threads for the merge [default: torch's, one per core]"
    )
    merge.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="for --adapter NAME: the gateway's state folder, which holds its catalog and adapter store "
        "[env LORA_GATEWAY_STATE_DIR; default: serve's]",
    )
    merge.add_argument(
        "--catalog-url",
        metavar="URL",
        help="for --adapter NAME: the gateway's catalog, when not under --state-dir [env LORA_GATEWAY_CATALOG_URL]",
    )
    merge.add_argument(
        "--store-url",
        metavar="URL",
        help="for --adapter NAME: the gateway's adapter store, when not under --state-dir [env LORA_GATEWAY_STORE_URL]",
    )
    return merge


def _fail(message: str) -> int:
    return fail("merge", message)


def run_merge(args: dict) -> int:
    from adapters.errors import AdapterError
    from adapters.merge import merge_adapter

    if args["threads"] is not None and args["threads"] < 1:
        return _fail("--threads must be at least 1")
    model, out = Path(args["model"]), Path(args["out"])
    if not (model / "config.json").is_file():
        return _fail(f"--model: {model} is not a model folder with a config.json (nothing is downloaded)")
    try:
        adapter_dir = _adapter_folder(args, model)
    except _Unresolved as exc:
        return _fail(str(exc))
    except AdapterError as exc:
        return _fail(f"--adapter: {exc.message}")
    print(f"merging {args['adapter']} into {model}", file=sys.stderr)
    try:
        merged = merge_adapter(model, adapter_dir, out, dtype=args["dtype"], threads=args["threads"])
    except AdapterError as exc:
        flag = {"model": "--model", "out": "--out", "dtype": "--dtype"}.get(exc.param or "", "--adapter")
        return _fail(f"{flag}: {exc.message}")
    print(f"merged model in {merged.folder} ({merged.dtype}, adapter rank {merged.rank})")
    return 0


class _Unresolved(Exception):
    """--adapter names neither a folder nor a registered adapter."""


def _adapter_folder(args: dict, model: Path) -> Path:
    """--adapter as a folder, or the store's copy of the registered adapter it names."""
    given = args["adapter"]
    if Path(given).is_dir():
        return Path(given)
    owner, sep, name = given.partition("/")
    if not sep:
        owner, name = "", given
    if not name or "/" in name or given.startswith((".", "~")):
        raise _Unresolved(f"--adapter: no adapter folder at {given}")
    from pydantic import ValidationError

    from adapters.base_model import fingerprint
    from adapters.database import BaseIdentity, Database
    from server.config import Settings

    overrides = {key: args[key] for key in ("state_dir", "catalog_url", "store_url") if args.get(key) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise _Unresolved(f"--state-dir/--catalog-url/--store-url: {exc.errors()[0]['msg']}") from None
    if settings.catalog_url is None and not (settings.state_dir / "catalog.sqlite3").is_file():
        raise _Unresolved(
            f"--adapter: {given} is not a folder, and there is no catalog under {settings.state_dir} to look it up; "
            "give the --state-dir (or --catalog-url) the gateway serves with"
        )
    try:
        catalog = Database(settings.catalog_location, BaseIdentity(str(model), fingerprint(model)))
    except ValueError as exc:
        raise _Unresolved(str(exc)) from None
    except ModuleNotFoundError:
        raise _Unresolved("--catalog-url: postgresql:// needs psycopg; install lora-gateway[postgres]") from None
    try:
        rows = {(row.owner, row.name): row for row in catalog.adapters()}
    finally:
        catalog.close()
    row = rows.get((owner, name))
    if row is None:
        known = ", ".join(f"{o}/{n}" if o else n for o, n in sorted(rows)) or "none"
        raise _Unresolved(
            f"--adapter: {given} is not a folder, nor an adapter registered on this base model (registered: {known})"
        )
    from adapters.store import open_adapter_store

    try:  # as serve opens it: a local folder, or a local cache of a shared folder or bucket
        store = open_adapter_store(settings.store_url, settings.state_dir / "adapters", settings.max_adapter_bytes)
    except ValueError as exc:
        raise _Unresolved(str(exc)) from None
    except ModuleNotFoundError:
        raise _Unresolved("--store-url: s3:// needs boto3; install lora-gateway[s3]") from None
    return store.ensure_local(row.content_hash)
