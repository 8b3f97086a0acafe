"""The export manifest (DESIGN.md "Artifacts"): what an export directory holds and where it came from.

llava-export writes manifest.json; the onnxruntime engine reads it and refuses an artifact that
does not match it. No torch here: this is on the fast cold-start path.

What is checked when an export is opened:
  * manifest.json exists, parses, is of the format this runtime reads, and its own checksum
    (`manifest_sha256`, over the rest of the file) matches: an edited manifest is refused;
  * every file it lists exists with the recorded size (sha256 too with `full=True`);
  * with a source checkpoint (MODEL_DIR/onnx opened for MODEL_DIR): the checkpoint is the one
    exported (sizes + mtimes first; the full sha256 only when they differ, e.g. after a copy);
  * the engine then checks each graph's input/output names and types against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
EXPORT_SUBDIR = "onnx"  # llava-export MODEL_DIR writes MODEL_DIR/onnx; llava-infer looks there


class ArtifactError(ValueError):
    """An export directory that is missing, incomplete, edited or built from another checkpoint."""


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(model_dir: Path) -> list[Path]:
    """config.json and the weights: what the export's numbers depend on."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = [index] + [model_dir / s for s in shards]
    else:
        weights = [model_dir / "model.safetensors"]
    return [model_dir / "config.json"] + weights


def checkpoint_fingerprint(model_dir: Path) -> dict:
    """Cheap identity: size and mtime of each file. Used to skip hashing when nothing changed."""
    out = {}
    for f in checkpoint_files(model_dir):
        st = f.stat()
        out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def checkpoint_sha256(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in checkpoint_files(model_dir):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def rebuild_hint(manifest: dict | None, export_dir: Path) -> str:
    source = (manifest or {}).get("source", {}).get("path") or "MODEL_DIR"
    return f"rebuild it: llava-export {source} --out {export_dir}"


def write_manifest(export_dir: Path, manifest: dict) -> Path:
    """Adds the file list (sizes, sha256) and the manifest's own checksum, then writes it."""
    files = {}
    for f in sorted(export_dir.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            files[f.name] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    body = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    body.pop("manifest_sha256", None)
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    path = export_dir / MANIFEST
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(export_dir: Path, source_dir: Path | None = None, full: bool = False) -> dict:
    """The manifest of a checked export directory; ArtifactError naming what to rebuild otherwise."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found; {export_dir} is not a llava-export directory ({rebuild_hint(None, export_dir)})")
    try:
        manifest = json.loads(path.read_text())
        claimed = manifest.pop("manifest_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise ArtifactError(f"{path} is not a valid manifest; {rebuild_hint(None, export_dir)}") from None
    hint = rebuild_hint(manifest, export_dir)
    if hashlib.sha256(_canonical(manifest)).hexdigest() != claimed:
        raise ArtifactError(f"{path} was edited after export (its checksum does not match); {hint}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format version {manifest.get('format_version')}, this runtime reads {FORMAT_VERSION}; {hint}"
        )
    verification = manifest.get("verification")
    if verification and not verification.get("ok"):
        raise ArtifactError(
            f"{export_dir} failed verification when exported ({', '.join(verification.get('drifted', []))} drifted "
            f"from the torch model); {hint}, or with a looser --tolerance if that drift is acceptable"
        )
    for name, info in manifest["files"].items():
        f = export_dir / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing from the export; {hint}")
        if f.stat().st_size != info["size"] or (full and file_sha256(f) != info["sha256"]):
            raise ArtifactError(f"{f} differs from the one exported (size or checksum); {hint}")
    if source_dir is not None:
        check_source(manifest, Path(source_dir), export_dir)
    return manifest


def check_source(manifest: dict, source_dir: Path, export_dir: Path) -> None:
    """Refuse an export of another checkpoint than `source_dir`."""
    recorded = manifest["source"]
    try:
        if checkpoint_fingerprint(source_dir) == recorded["fingerprint"]:
            return
        actual = checkpoint_sha256(source_dir)
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"cannot read the checkpoint in {source_dir} to match it with {export_dir} ({e})") from None
    if actual != recorded["checkpoint_sha256"]:
        raise ArtifactError(
            f"{export_dir} was exported from another checkpoint (sha256 {recorded['checkpoint_sha256'][:12]}, "
            f"{source_dir} is {actual[:12]}); rebuild it: llava-export {source_dir} --out {export_dir}"
        )


def find_export(model_dir: Path) -> Path | None:
    """The export that serves model_dir: the directory itself if it is one, else MODEL_DIR/onnx."""
    model_dir = Path(model_dir)
    if (model_dir / MANIFEST).is_file():
        return model_dir
    candidate = model_dir / EXPORT_SUBDIR
    return candidate if (candidate / MANIFEST).is_file() else None
