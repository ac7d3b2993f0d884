"""Command line for models and references: argument parsing and wiring only.

    scoreq-live models list [--json]
    scoreq-live models pull NAME... [--mirror URL] [--force]
    scoreq-live models import NAME FILE [--md5 HEX] [--mirror URL]
    scoreq-live models quantize NAME --int8|--fp16 --data PATH... [--ops OPS] [--force]
    scoreq-live models remove NAME
    scoreq-live models triton-repo DIR [NAME...] [--bench JSON] [--fp16] [--gpus N] [--instances N]
    scoreq-live reference add NAME FILE... --model MODEL [--force]
    scoreq-live reference list|show NAME|remove NAME
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers returns


def _err(msg: str) -> int:
    print(f"scoreq-live: error: {msg}", file=sys.stderr)
    return 2


def add_models_commands(sub: Subparsers) -> None:
    """The ``models`` verbs, on the ``models`` sub-parser's subparsers."""
    ls = sub.add_parser("list", help="list known models, whether installed and where")
    ls.add_argument("--json", action="store_true", help="one JSON object per model")
    pull = sub.add_parser("pull", help="download published models (SCOREQ's, from Zenodo) into the model folder")
    pull.add_argument("names", nargs="+", metavar="NAME", help="e.g. scoreq-natural-nr; 'all' for every one")
    pull.add_argument("--mirror", metavar="URL", help="base URL that serves Zenodo's paths "
                                                      "(default: $SCOREQ_LIVE_MIRROR, else https://zenodo.org)")
    pull.add_argument("--force", action="store_true", help="download again even if installed")
    imp = sub.add_parser("import", help="register a model file fetched elsewhere (verified like a download)")
    imp.add_argument("name", metavar="NAME")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--md5", metavar="HEX", help="the published md5 (as zenodo.org shows it), for machines "
                                                   "that cannot reach the record API")
    imp.add_argument("--mirror", metavar="URL", help="where to read the published checksum from")
    q = sub.add_parser("quantize", help="make an int8 or fp16 variant and measure its fidelity on real speech")
    q.add_argument("name", metavar="NAME")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--int8", action="store_true", help="dynamic int8 weights (of --ops)")
    which.add_argument("--fp16", action="store_true", help="float16 weights and activations")
    q.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="speech to measure fidelity on: files, folders, list files")
    q.add_argument("--ops", metavar="OPS", help="int8: operator types to quantise, comma-separated (default MatMul)")
    q.add_argument("--max-windows", type=int, default=100, metavar="N", help="windows to compare (default 100)")
    q.add_argument("--max-delta", type=float, metavar="X",
                   help="largest allowed |delta| (default 0.1 MOS; distances: 2.5%% of their range)")
    q.add_argument("--min-pearson", type=float, metavar="R", help="smallest allowed Pearson (default 0.99)")
    q.add_argument("--force", action="store_true", help="keep the variant even if it misses the bar")
    q.add_argument("--threads", type=int, metavar="N", help="CPU threads for the timing (default: all cores)")
    q.add_argument("--report", metavar="PATH|-", help="also write the fidelity report as JSON")
    rm = sub.add_parser("remove", help="delete a downloaded, imported or derived model from the model folder")
    rm.add_argument("name", metavar="NAME")
    tr = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository (ONNX Runtime "
                                            "backend, dynamic batching) for --backend triton://HOST:8001/NAME")
    tr.add_argument("dir", metavar="DIR")
    tr.add_argument("names", nargs="*", metavar="NAME", help="catalogue models (default: every installed one)")
    tr.add_argument("--bench", metavar="JSON", help="a 'scoreq-live bench --json' report made on the serving "
                                                    "machine: its batch sizes and run time set the batcher")
    tr.add_argument("--fp16", action="store_true", help="also write each model's float16 variant as NAME-fp16")
    tr.add_argument("--gpus", type=int, default=1, metavar="N", help="GPUs per server, 0 for CPU only (default 1)")
    tr.add_argument("--instances", type=int, default=1, metavar="N",
                    help="model instances on each GPU (or on the CPU) (default 1)")


def add_reference_parser(sub: Subparsers) -> None:
    """The ``reference`` command and its verbs, on the top-level subparsers."""
    r = sub.add_parser("reference", help="stored references for --mode ref (clean speech, embedded once)")
    rs = r.add_subparsers(dest="reference_command")
    add = rs.add_parser("add", help="embed clean speech files once and store them under NAME")
    add.add_argument("name", metavar="NAME")
    add.add_argument("files", nargs="+", metavar="CLEAN.wav")
    add.add_argument("--model", required=True, help="embedding model, e.g. scoreq-natural-ref (the reference "
                                                     "only works with this model)")
    add.add_argument("--window", type=float, metavar="S", help="window length (default: the model's)")
    add.add_argument("--hop", type=float, metavar="S", help="hop (default: the model's)")
    add.add_argument("--min-speech", type=float, default=0.2, metavar="F", help="speech fraction a window needs")
    add.add_argument("--vad", type=int, default=2, choices=(0, 1, 2, 3), help="VAD aggressiveness (default 2)")
    add.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add.add_argument("--force", action="store_true", help="replace a stored reference of that name")
    ls = rs.add_parser("list", help="list stored references")
    ls.add_argument("--json", action="store_true")
    show = rs.add_parser("show", help="what a stored reference holds")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true")
    rm = rs.add_parser("remove", help="delete a stored reference")
    rm.add_argument("name", metavar="NAME")


# ---------------------------------------------------------------- models

def _size(n: int | None) -> str:
    return "" if not n else f"{n / 1e6:.0f} MB"


def cmd_models(a: argparse.Namespace) -> int:
    """``models`` verbs (``list`` when none is given)."""
    verb = getattr(a, "models_command", None) or "list"
    return {"list": _models_list, "pull": _models_pull, "import": _models_import,
            "quantize": _models_quantize, "remove": _models_remove, "triton-repo": _models_triton_repo}[verb](a)


def _models_list(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from scoreq_live.scoring import store
    from scoreq_live.scoring.catalogue import is_available, known_models, published_file

    rows: list[dict[str, Any]] = []
    for spec in known_models().values():
        installed = is_available(spec)
        manifest = store.read_manifest(spec.file) if spec.file is not None and not spec.bundled else None
        published = published_file(spec.name)
        if installed and spec.file is not None:
            size: int | None = spec.file.stat().st_size
        else:
            size = published.approx_size if published else None
        rows.append({
            "name": spec.name, "domain": spec.domain, "mode": spec.mode, "kind": spec.kind,
            "window_s": spec.default_window_s, "size": size, "size_is_estimate": not installed,
            "licence": (manifest or {}).get("licence") or spec.licence, "installed": installed,
            "bundled": spec.bundled, "path": str(spec.file) if installed else None,
            "url": spec.url, "description": spec.description,
        })
    if getattr(a, "json", False):
        for r in rows:
            print(json.dumps(r))
        return 0
    # Narrow enough for 80 columns: the long fields (licence terms, path, description) go below the table.
    t = Table(title=f"models (folder: {store.models_dir()})", box=None, header_style="bold", pad_edge=False,
              padding=(0, 1, 0, 0))
    t.add_column("name", no_wrap=True)
    for c in ("domain", "mode", "kind", "window", "size", "licence", "installed"):
        t.add_column(c, no_wrap=True)
    for r in rows:
        where = "bundled" if r["bundled"] else ("yes" if r["installed"] else "no")
        short_licence = r["licence"].split(" (")[0].split(" weights")[0]
        t.add_row(r["name"], r["domain"], r["mode"], r["kind"], f"{r['window_s']:g}s",
                  ("~" if r["size_is_estimate"] and r["size"] else "") + _size(r["size"]), short_licence, where)
    out = Console()
    out.print(t)
    for r in rows:
        out.print()
        out.print(f"[bold]{r['name']}[/]: {r['description']}", highlight=False)
        out.print(f"  licence: {r['licence']}", highlight=False)
        if r["installed"] and not r["bundled"]:
            out.print(f"  file: {r['path']}", highlight=False)
        elif not r["installed"] and published_file(r["name"]):
            out.print(f"  not installed: scoreq-live models pull {r['name']}", highlight=False)
    return 0


def _models_pull(a: argparse.Namespace) -> int:
    from scoreq_live.progress import ConsoleProgress
    from scoreq_live.scoring.catalogue import PUBLISHED, is_available, known_models, pull_model
    from scoreq_live.scoring.spec import ModelError

    names = sorted(PUBLISHED) if a.names == ["all"] else a.names
    failed = 0
    for name in names:
        spec = known_models().get(name)
        if spec is not None and is_available(spec) and not a.force:
            print(f"{name}: installed ({spec.file})", file=sys.stderr)
            continue
        try:
            with ConsoleProgress(f"{name}") as progress:
                pulled = pull_model(name, mirror=a.mirror, progress=progress, force=a.force)
        except ModelError as e:
            failed += 1
            _err(str(e))
            continue
        print(f"{name}: installed ({pulled.file}), checksum and model contract verified", file=sys.stderr)
    return 1 if failed else 0


def _models_import(a: argparse.Namespace) -> int:
    from scoreq_live.progress import ConsoleProgress
    from scoreq_live.scoring.catalogue import import_model
    from scoreq_live.scoring.spec import ModelError

    try:
        with ConsoleProgress(f"checking {Path(a.file).name}") as progress:
            spec = import_model(a.name, a.file, md5=a.md5, mirror=a.mirror, progress=progress)
    except ModelError as e:
        return _err(str(e))
    print(f"{a.name}: installed ({spec.file}), checksum and model contract verified", file=sys.stderr)
    return 0


def _models_remove(a: argparse.Namespace) -> int:
    from scoreq_live.scoring import store
    from scoreq_live.scoring.catalogue import known_models

    spec = known_models().get(a.name)
    if spec is None:
        return _err(f"unknown model {a.name!r}")
    if spec.bundled:
        return _err(f"{a.name} is bundled with the package; there is nothing to remove")
    if spec.file is None or not (spec.file.exists() or store.manifest_path(spec.file).exists()):
        return _err(f"{a.name} is not installed")
    store.remove(spec.file)
    print(f"{a.name}: removed {spec.file}", file=sys.stderr)
    return 0


def _models_triton_repo(a: argparse.Namespace) -> int:
    from scoreq_live.errors import ScoreqLiveError
    from scoreq_live.scoring.triton_repo import write_repository

    root = Path(a.dir)
    try:
        written = write_repository(root, a.names, bench=Path(a.bench) if a.bench else None, gpus=a.gpus,
                                   instances=a.instances, fp16=a.fp16)
    except ScoreqLiveError as e:
        return _err(str(e))
    for folder in written:
        print(f"{folder.name}: {folder / 'config.pbtxt'}", file=sys.stderr)
    print(f"serve it: docker run --gpus all -p8000:8000 -p8001:8001 -v {root.resolve()}:/models "
          "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models", file=sys.stderr)
    return 0


def _models_quantize(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from scoreq_live.core.stream import StreamConfig
    from scoreq_live.offline import InputError, expand_paths
    from scoreq_live.progress import ConsoleProgress
    from scoreq_live.scoring import store
    from scoreq_live.scoring.catalogue import known_models, resolve_model
    from scoreq_live.scoring.quantize import Bar, FidelityError, Variant, quantize
    from scoreq_live.scoring.spec import ModelError, ModelSpec

    err = Console(stderr=True)
    spec = known_models().get(a.name)
    if spec is None:
        return _err(f"unknown model {a.name!r} (see 'scoreq-live models list')")
    if spec.file is not None and (store.read_manifest(spec.file) or {}).get("variant_of"):
        return _err(f"{a.name} is a variant already: quantize the original")
    try:
        with ConsoleProgress(f"downloading {a.name}", console=err) as progress:
            spec = resolve_model(a.name, progress=progress)  # downloads a published model not installed yet
        files = expand_paths(a.data)
        window_s, hop_s = spec.windowing()
    except (ModelError, InputError) as e:
        return _err(str(e))
    variant: Variant = "int8" if a.int8 else "fp16"
    ops = [o.strip() for o in a.ops.split(",") if o.strip()] if a.ops else None
    if ops and variant != "int8":
        return _err("--ops only applies to --int8")
    config = StreamConfig(window_s=window_s, hop_s=hop_s, model=spec.name, mode=spec.mode)
    bar = Bar.default(spec.kind, a.max_delta, a.min_pearson)
    vspec: ModelSpec | None
    try:
        vspec, report = quantize(spec, variant, files, config, ops=ops, bar=bar, force=a.force,
                                 max_windows=a.max_windows, threads=a.threads,
                                 status=lambda m: err.print(m, highlight=False))
        code = 0
    except FidelityError as e:
        report, vspec, code = e.report, None, 1
        _err(str(e))
    except ModelError as e:
        return _err(str(e))
    t = Table(title=f"fidelity: {report['model']} vs {report['variant']} on {report['windows']} windows "
                    f"({report['files']} files)")
    for c in ("", "original", report["variant"]):
        t.add_column(c, justify="right")
    t.add_row("ms per window (batch 1)", f"{report['ms_per_window']['original']:.1f}",
              f"{report['ms_per_window']['variant']:.1f}")
    t.add_row(f"ms per {report['native_window_s']:g} s window", f"{report['ms_per_native_window']['original']:.1f}",
              f"{report['ms_per_native_window']['variant']:.1f}")
    t.add_row("size", f"{report['size_mb']['original']:.0f} MB", f"{report['size_mb']['variant']:.0f} MB")
    t.add_row(f"max |delta| ({report['unit']})", "",
              f"{report['max_abs_delta']:.4g} (bar {report['bar']['max_abs_delta']:.4g})")
    t.add_row(f"mean |delta| ({report['unit']})", "", f"{report['mean_abs_delta']:.4g}")
    t.add_row("Pearson", "", f"{report['pearson']:.5f} (bar {report['bar']['min_pearson']})")
    Console(stderr=a.report == "-").print(t)
    if a.report:
        text = json.dumps(report, indent=1)
        if a.report == "-":
            print(text)
        else:
            Path(a.report).write_text(text + "\n")
    if vspec is not None:
        note = " (forced: it misses the bar)" if report.get("forced") else ""
        err.print(f"{vspec.name}: installed ({vspec.file}){note}", highlight=False)
    return code


# ---------------------------------------------------------------- references

def cmd_reference(a: argparse.Namespace) -> int:
    """``reference`` verbs (``list`` when none is given)."""
    verb = getattr(a, "reference_command", None) or "list"
    return {"add": _ref_add, "list": _ref_list, "show": _ref_show, "remove": _ref_remove}[verb](a)


def _ref_add(a: argparse.Namespace) -> int:
    from scoreq_live.core.stream import StreamConfig
    from scoreq_live.files import special_kind
    from scoreq_live.progress import ConsoleProgress
    from scoreq_live.scoring.catalogue import resolve_model
    from scoreq_live.scoring.references import ReferenceStore, StoredReferenceError
    from scoreq_live.scoring.session import OnnxModel
    from scoreq_live.scoring.spec import ModelError
    from scoreq_live.scoring.store import fingerprint

    for f in a.files:
        if not Path(f).is_file():
            kind = special_kind(f)
            return _err(f"no such file: {f}" if kind is None
                        else f"{f} is {kind}, not a regular file; give an audio file")
    try:
        with ConsoleProgress(f"downloading {a.model}") as progress:
            spec = resolve_model(a.model, progress=progress)
        model = OnnxModel(spec, device=a.device)
        spec = model.spec
        window_s, hop_s = spec.windowing(a.window, a.hop)
    except ModelError as e:
        return _err(str(e))
    assert spec.file is not None  # a loaded model has a file
    config = StreamConfig(window_s=window_s, hop_s=hop_s, min_speech=a.min_speech, vad_aggressiveness=a.vad,
                          model=spec.name, mode="ref")
    try:
        ref = ReferenceStore().add(a.name, a.files, model, config, fingerprint(spec.file), replace=a.force)
    except StoredReferenceError as e:
        return _err(str(e))
    print(f"reference {ref.name}: {ref.windows} windows of {len(ref.files)} files embedded with {ref.model} "
          f"({ref.dim}-d); use it with: --mode ref --reference {ref.name}", file=sys.stderr)
    return 0


def _ref_list(a: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from scoreq_live.scoring.references import ReferenceStore, StoredReferenceError

    store = ReferenceStore()
    try:
        refs = store.list()
    except StoredReferenceError as e:
        return _err(str(e))
    if getattr(a, "json", False):
        for r in refs:
            print(json.dumps(r.to_dict()))
        return 0
    t = Table(title=f"references ({store.root})")
    for c in ("name", "model", "files", "windows", "speech", "created"):
        t.add_column(c)
    for r in refs:
        t.add_row(r.name, r.model, str(len(r.files)), str(r.windows),
                  f"{sum(f['duration_s'] for f in r.files):.1f}s", r.created)
    Console().print(t)
    return 0


def _ref_show(a: argparse.Namespace) -> int:
    from scoreq_live.scoring.references import ReferenceStore, StoredReferenceError

    try:
        r = ReferenceStore().get(a.name)
    except StoredReferenceError as e:
        return _err(str(e))
    if a.json:
        print(json.dumps(r.to_dict(), indent=1))
        return 0
    print(f"reference {r.name}\n  model     {r.model} (sha256 {r.model_sha256[:16]}...), {r.dim}-d embeddings\n"
          f"  windows   {r.windows} ({r.window_s:g}s, hop {r.hop_s:g}s, min speech {r.min_speech:.0%}, vad {r.vad})\n"
          f"  created   {r.created} (scoreq-live {r.scoreq_live})\n  files")
    for f in r.files:
        print(f"    {f['path']}  {f['duration_s']:.2f}s  {f['windows']} windows  sha256 {f['sha256'][:16]}...")
    return 0


def _ref_remove(a: argparse.Namespace) -> int:
    from scoreq_live.scoring.references import ReferenceStore, StoredReferenceError

    try:
        ReferenceStore().remove(a.name)
    except StoredReferenceError as e:
        return _err(str(e))
    print(f"reference {a.name}: removed", file=sys.stderr)
    return 0
