"""Subprocess plumbing of `benchmarks.maskrcnn`: how a worker interpreter (keras-cv-nightly's,
torchvision's) is started and how its JSON result or its failure reaches the results.

The timings themselves are measured by the benchmark, not here.
"""
import importlib.util
import stat
import sys
import textwrap

import pytest

from benchmarks import maskrcnn


def fake_python(tmp_path, body):
    """An executable shell script standing in for a worker's Python interpreter."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_worker_result_line_is_parsed_and_progress_echoed(tmp_path, capsys):
    python = fake_python(tmp_path, f"""\
        echo "  torchvision step 1: 2.00 s"
        echo "a warning" >&2
        echo '{maskrcnn.WORKER_RESULT}{{"torchvision_step_s": 2.5, "argv": "'"$*"'", "path": "'"$PYTHONPATH"'"}}'
        """)  # noqa: E501
    result = maskrcnn.run_worker(python, "--torchvision-worker", 3, 64, 1, ["/extra/dir"],
                                 "torchvision_error")

    assert result["torchvision_step_s"] == 2.5
    assert result["argv"] == ("-m benchmarks.maskrcnn --torchvision-worker --steps 3 "
                              "--image-size 64 --batch-size 1")
    assert result["path"].split(":") == ["/extra/dir", str(maskrcnn.REPO_ROOT)]
    assert "torchvision step 1: 2.00 s" in capsys.readouterr().out


def test_worker_without_result_reports_exit_code_and_stderr(tmp_path):
    python = fake_python(tmp_path, """\
        echo "started"
        echo "ImportError: no torch here" >&2
        exit 3
        """)
    result = maskrcnn.run_worker(python, "--torchvision-worker", 1, 64, 1, [], "torchvision_error")

    assert list(result) == ["torchvision_error"]
    assert "exited with 3" in result["torchvision_error"]
    assert "ImportError: no torch here" in result["torchvision_error"]


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="this interpreter has torch")
def test_torchvision_worker_in_an_interpreter_without_torch_records_the_import_error():
    # The real worker, started as the benchmark starts it: it must get as far as `import torch`.
    result = maskrcnn.benchmark_torchvision(1, 64, 1, sys.executable)

    assert list(result) == ["torchvision_error"]
    assert "No module named 'torch'" in result["torchvision_error"]


def test_missing_torch_python_says_how_to_create_it(tmp_path):
    result = maskrcnn.benchmark_torchvision(1, 64, 1, tmp_path / "no_venv" / "bin" / "python")

    assert list(result) == ["torchvision_error"]
    message = result["torchvision_error"]
    assert str(tmp_path / "no_venv" / "bin" / "python") in message
    assert "pip install torch==2.14.1 torchvision==0.29.1" in message
    assert "--torch-python" in message
