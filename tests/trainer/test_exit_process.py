"""`exit_process`: a finished rank ends without interpreter finalization, its output intact."""

import subprocess
import sys
import textwrap


def test_exit_process_flushes_output_keeps_the_code_and_skips_finalization(tmp_path):
    marker = tmp_path / "finalized"
    script = textwrap.dedent(
        f"""
        import atexit, sys
        from stalwart.trainer.parallel import exit_process

        atexit.register(lambda: open({str(marker)!r}, "w").close())
        sys.stdout.write("result without a newline")
        sys.stderr.write("log without a newline")
        exit_process(7)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 7, completed.stderr
    # Block-buffered when piped: lost without the flush before os._exit.
    assert completed.stdout == "result without a newline"
    assert completed.stderr.endswith("log without a newline")
    # Finalization (where gloo's threads abort the process) never ran.
    assert not marker.exists()
