"""engine.cli.run_cli: an allocator's failure anywhere is one line and exit 1, never a traceback
(issue 23, fault 3: under a memory limit, 'DefaultCPUAllocator: can't allocate memory' came
out as a Python traceback)."""

import pytest
import torch

from engine.cli import run_cli


def run(main, capsys):
    code = run_cli(main, [])
    return code, capsys.readouterr().err


def test_the_cpu_allocator_s_failure_is_one_line(capsys):
    def main(argv):  # a real failure of torch's CPU allocator: 2^50 bytes exist nowhere
        torch.empty(1 << 50, dtype=torch.uint8)

    code, err = run(main, capsys)
    assert code == 1
    assert err == (
        "error: out of memory: the CPU allocator could not allocate 1125899.9 GB; a smaller batch or model "
        "needs less (training: --micro-batch-size keeps the batch, accumulating gradients)\n"
    )


def test_cuda_out_of_memory_and_memory_error_are_one_line(capsys):
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB "
        "is free. Of the allocated memory 75.1 GiB is allocated by PyTorch, and 1.2 GiB is reserved ..."
    )
    for error, said in ((cuda, "CUDA out of memory. Tried to allocate 2.00 GiB"), (MemoryError(), "MemoryError")):

        def main(argv, error=error):
            raise error

        code, err = run(main, capsys)
        assert code == 1 and err.count("\n") == 1 and err.startswith(f"error: out of memory: {said};")


def test_other_runtime_errors_stay_tracebacks(capsys, monkeypatch):
    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(main, [])
    monkeypatch.setenv("GPT1_DEBUG", "1")

    def oom(argv):
        raise MemoryError

    with pytest.raises(MemoryError):  # GPT1_DEBUG=1 shows the traceback
        run_cli(oom, [])
