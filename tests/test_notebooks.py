"""Every notebook in notebooks/ runs top to bottom without an error.

Each one is executed with nbclient in a fresh `python3` kernel. jupyter_client starts that kernel
with this interpreter (sys.executable), and a first injected cell checks that it did. The kernel's
working directory is a temporary directory. Outputs stay in memory and are never written back to
the repository. The notebooks assert their own results (loss falls, logits match), so a failed
check is a cell error here.
"""

import glob
import os
import re
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 300

pytestmark = [
    # jupyter_client / nbclient / zmq / traitlets are the test harness, not the code under test.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:zmq.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:nbclient.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:traitlets.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_core.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_client.*"),
]


def _kernel_env(tmp_path) -> dict:
    """The kernel's environment: this one, on CPU, offline, with a single host device (conftest asks
    for 8 fake devices; a notebook is a user's single-device session) and with JAX's persistent
    compilation cache shared with the rest of the test suite."""
    import jax

    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "IPYTHONDIR": str(tmp_path / "ipython"),  # no profile written to the user's home
        "JAX_NUMPY_RANK_PROMOTION": "raise",  # as strict as the rest of the suite
    })
    cache_dir = jax.config.jax_compilation_cache_dir
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def test_notebooks_found():
    """At least the quickstart is here (an empty glob would silently test nothing)."""
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert "01_quickstart.ipynb" in names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    import nbclient
    import nbformat

    with open(path, encoding="utf-8") as f:
        nb = nbformat.read(f, as_version=4)
    # Committed notebooks carry no outputs (outputs are regenerated, never reviewed as diffs).
    stale = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not stale, f"{os.path.basename(path)}: code cells {stale} have outputs; clear them before committing"

    check = nbformat.v4.new_code_cell(
        f"import sys\nassert sys.executable == {sys.executable!r}, sys.executable")
    check.pop("id", None)
    nb.cells.insert(0, check)
    if nb.nbformat_minor >= 5:
        check["id"] = "interpreter-check"

    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    t0 = time.perf_counter()
    try:
        client.execute(env=_kernel_env(tmp_path))
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{os.path.basename(path)} failed:\n{e}", pytrace=False)
    print(f"[notebooks] {os.path.basename(path)}: {time.perf_counter() - t0:.1f}s")
