"""Build the side environments of the reader tests and run them (tests/readers, marker ``readers``).

Usage::

    python scripts/check_readers.py [--home DIR] [--build-only] [--only tf4,llmc,llama.cpp,vllm] [--jobs 1]

Each reader pins its own transformers, so each gets its own place under ``--home`` (default
``$MOEPRUNE_READERS_HOME`` or ``~/.cache/moeprune-readers``), never moeprune's environment:

- ``tf4/``: a venv with transformers 4.57.6 (the version llama.cpp's converter pins) and the converter's
  requirements (sentencepiece, protobuf);
- ``llmc/``: a venv with llm-compressor 0.14.0.1 (it brings transformers 5.17);
- ``llama.cpp/``: the llama.cpp source release vendored in llama-cpp-python 0.3.36's sdist (a PyPI package,
  so no other download), with ``llama-perplexity`` and ``llama-tokenize`` built (CPU, ``--jobs`` parallel
  compiles at nice 10: about 1 h with one job on 2 shared cores);
- ``vllm-src/``: vLLM 0.34.0's model files (qwen2_moe, mixtral, deepseek_v2, registry), unzipped from its wheel
  (``--no-deps``: nothing of vLLM is installed).

Every step is skipped when its result exists. Then ``pytest -m readers tests/readers`` runs with
MOEPRUNE_READERS_HOME set, plus the static vLLM tests (those also run in the default suite). About 15 minutes
once built.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
TF4 = ["transformers==4.57.6", "safetensors", "numpy", "sentencepiece>=0.1.98,<0.3.0", "protobuf>=4.21.0,<5.0.0"]
LLMC = ["llmcompressor==0.14.0.1"]
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VLLM = "vllm==0.34.0"
VLLM_FILES = ("qwen2_moe.py", "mixtral.py", "deepseek_v2.py", "registry.py")
LLAMA_TARGETS = ("llama-perplexity", "llama-tokenize")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF",
               "-DBUILD_SHARED_LIBS=OFF"]


def run(*cmd: str | Path, nice: bool = False, **kwargs) -> None:
    args = (["nice", "-n", "10"] if nice else []) + [str(c) for c in cmd]
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, **kwargs)


def venv(path: Path, packages: list[str]) -> None:
    python = path / "bin" / "python"
    if python.exists():
        return
    run(sys.executable, "-m", "venv", path)
    run(python, "-m", "pip", "install", "-q", TORCH, nice=True)  # first, so the rest does not pick another torch
    run(python, "-m", "pip", "install", "-q", *packages, nice=True)


def llama_cpp(home: Path, jobs: int) -> None:
    src = home / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").exists():
        with tempfile.TemporaryDirectory() as tmp:
            run(sys.executable, "-m", "pip", "download", "-q", LLAMA_CPP_SDIST, "--no-deps", "--no-binary", ":all:",
                "-d", tmp)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            vendored.rename(src)
    if all((src / "build" / "bin" / t).exists() for t in LLAMA_TARGETS):
        return
    run("cmake", "-S", src, "-B", src / "build", *CMAKE_FLAGS, nice=True)
    run("cmake", "--build", src / "build", "-j", str(jobs), "--target", *LLAMA_TARGETS, nice=True)


def vllm_source(home: Path) -> None:
    models = home / "vllm-src" / "vllm" / "model_executor" / "models"
    if all((models / name).exists() for name in VLLM_FILES):
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(sys.executable, "-m", "pip", "download", "-q", VLLM, "--no-deps", "-d", tmp)
        wheel = next(Path(tmp).glob("vllm-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in VLLM_FILES:
                archive.extract(f"vllm/model_executor/models/{name}", home / "vllm-src")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_home = os.environ.get("MOEPRUNE_READERS_HOME", str(Path.home() / ".cache" / "moeprune-readers"))
    ap.add_argument("--home", type=Path, default=Path(default_home))
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--only", default="tf4,llmc,llama.cpp,vllm", help="comma-separated subset to build")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compiles for llama.cpp (CPU is shared)")
    args = ap.parse_args()
    home, only = args.home, set(args.only.split(","))
    home.mkdir(parents=True, exist_ok=True)
    if "tf4" in only:
        venv(home / "tf4", TF4)
    if "llmc" in only:
        venv(home / "llmc", LLMC)
    if "llama.cpp" in only:
        llama_cpp(home, args.jobs)
    if "vllm" in only:
        vllm_source(home)
    if args.build_only:
        return 0
    env = {**os.environ, "MOEPRUNE_READERS_HOME": str(home), "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "pytest", "-m", "readers or not readers", "tests/readers", "-v", "-s", "-rs",
           "-p", "no:cacheprovider"]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
