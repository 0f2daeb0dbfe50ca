"""Fixtures shared across test modules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model_fixtures import SMOLLM_DIR, transformers_or_skip


@pytest.fixture(scope="session")
def smollm_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint, materialized once per session."""
    if not os.path.isdir(SMOLLM_DIR):
        pytest.skip("../shared/models/smollm2-135m-instruct is not present")
    transformers_or_skip()
    pytest.importorskip("gguf")
    out = str(tmp_path_factory.mktemp("smollm2"))
    subprocess.run([sys.executable, os.path.join(SMOLLM_DIR, "materialize.py"), out], check=True,
                   capture_output=True)
    return out
