"""Tensor parallelism: 2 CPU processes (gloo, launched with torchrun) give the logits (fp32, 1e-5)
and the greedy tokens of one process, each rank holding half the heads, MLP columns, experts
and vocabulary."""

import os
import subprocess
import sys

import pytest
import torch

from dsv3.config import tiny
from dsv3.load import load
from dsv3.model import Transformer
from dsv3.parallel import Parallel

from hf_checkpoints import hf_checkpoint, run_prefill_and_decode  # noqa: F401

WORKER = os.path.join(os.path.dirname(__file__), "tp_worker.py")


def _torchrun(*args, tmp_path):
    out = str(tmp_path / "tp_result.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, *args, out]
    here = os.path.dirname(os.path.abspath(__file__))
    # the worker imports hf_checkpoints (here) and the package (the repository root, if not installed)
    path = os.pathsep.join([here, os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang fails, not blocks
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_ranks_equal_one_process(hf_checkpoint, tmp_path):  # noqa: F811
    path, _ = hf_checkpoint()  # 4 heads, dense 256 and expert 128 columns, 16 experts, vocab 320
    from tp_worker import PROMPTS, STEPS
    want = run_prefill_and_decode(load(path, torch.float32, backend="torch", progress=False), PROMPTS, STEPS)
    ranks = _torchrun(path, tmp_path=tmp_path)
    assert [r["heads"] for r in ranks] == [2, 2]
    assert [r["experts"] for r in ranks] == [(0, 8), (8, 16)] and [r["vocab"] for r in ranks] == [160, 160]
    for r in ranks:
        prefill, steps, tokens = r["run"]
        for g, w in zip(prefill + steps, want[0] + want[1]):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        assert tokens == want[2]


def test_uneven_split_names_the_field(tmp_path):
    messages = _torchrun("uneven", tmp_path=tmp_path)
    assert all("vocab_size = 321 does not split over 2 tensor-parallel ranks" in m for m in messages), messages


def test_generate_command_under_torchrun(hf_checkpoint):  # noqa: F811
    """`torchrun -m dsv3.generate`: 2 ranks print (rank 0 only) the text one process prints."""
    path, _ = hf_checkpoint()
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH", "")])}
    args = ["--model", path, "--prompt", "def f(x):", "--max-new-tokens", "8", "--dtype", "float32",
            "--backend", "torch"]
    one = subprocess.run([sys.executable, "-m", "dsv3.generate", *args], env=env, capture_output=True, text=True,
                         timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "dsv3.generate", *args], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert one.stdout.startswith("def f(x):") and len(one.stdout) > len("def f(x):\n")
    assert two.stdout == one.stdout


@pytest.mark.parametrize("field, overrides", [
    ("vocab_size", dict(vocab_size=255)),
    ("num_attention_heads", dict(num_attention_heads=3)),  # 3 heads' columns are even: must not cut a head
    ("intermediate_size", dict(intermediate_size=250)),  # 62.5 per rank of 4
    ("n_routed_experts", dict(n_routed_experts=18, n_group=6, topk_group=2)),
])
def test_uneven_split_names_the_field_in_process(field, overrides):
    """Rank 1 of 4 (no process group needed to build it), with a dim that does not split over 4."""
    par = Parallel(rank=1, world=4)
    Transformer(tiny(), torch.float32, device="meta", parallel=par)  # the tiny config itself splits over 4
    with pytest.raises(ValueError, match=rf"^{field} = \d+ does not split over 4 tensor-parallel ranks"):
        Transformer(tiny(**overrides), torch.float32, device="meta", parallel=par)
