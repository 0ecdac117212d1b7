"""Expert parallelism with data-parallel attention: 2 and 4 CPU processes (gloo, torchrun), each
with its own requests (different lengths and decode steps; rank 1 with none), give the fp32
logits (1e-5) and greedy tokens of one process running all the requests; FP8 dispatch stays
within FP8 rounding of them; `torchrun -m dsv3.generate --parallel ep` prints one process's text.
The NCCL path (the same code on CUDA tensors) needs 2 GPUs."""

import os
import subprocess
import sys

import pytest
import torch

from dsv3.load import load
from dsv3.parallel import Parallel, per_token
from dsv3_kernels.reference.fp8 import calc_diff

from ep_worker import REQUESTS, run_requests, share
from hf_checkpoints import hf_checkpoint  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ep_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(os.path.dirname(HERE)), os.environ.get("PYTHONPATH", "")])}


def _torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)  # a hang fails, not blocks
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_with_their_own_requests_equal_one_process(hf_checkpoint, tmp_path, world):  # noqa: F811
    path, _ = hf_checkpoint()  # 16 experts, top-4 in 2 of 4 groups, hidden 128
    want = run_requests(load(path, torch.float32, backend="torch", progress=False), REQUESTS)
    out = str(tmp_path / "ep_result.pt")
    _torchrun(world, WORKER, path, out)
    ranks = torch.load(out, weights_only=False)
    assert sorted(i for r in ranks for i in r["requests"]) == list(range(len(REQUESTS)))
    assert ranks[1]["requests"] == [] and all(r["requests"] == share(k, world) for k, r in enumerate(ranks))
    assert [r["experts"] for r in ranks] == [(k * 16 // world, (k + 1) * 16 // world) for k in range(world)]
    assert all(r["heads"] == 4 for r in ranks)  # attention whole on every rank
    slots = [r["eplb_slots"] for r in ranks]  # 16 experts + `world` replicas: expert 0 (30% of the load) twice
    assert all(len(s) == 16 // world + 1 for s in slots) and sum(s.count(0) for s in slots) >= 2
    for r in ranks:
        for i, (prefill, steps, tokens) in zip(r["requests"], r["run"]):
            w_prefill, w_steps, w_tokens = want[i]
            torch.testing.assert_close(prefill, w_prefill, rtol=0, atol=1e-5)
            assert len(steps) == len(w_steps) == REQUESTS[i][1]
            for g, w in zip(steps, w_steps):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            assert tokens == w_tokens
        for i, (prefill, steps, tokens) in zip(r["requests"], r["eplb"]):  # redundant experts: the same math
            torch.testing.assert_close(prefill, want[i][0], rtol=0, atol=1e-5)
            for g, w in zip(steps, want[i][1]):
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
            assert tokens == want[i][2]
        for i, (prefill, steps, tokens) in zip(r["requests"], r["fp8"]):  # e4m3 rows: FP8 rounding
            assert calc_diff(prefill, want[i][0]) < 1e-3
            same = next((n for n, (a, b) in enumerate(zip(tokens, want[i][2])) if a != b), len(tokens))
            for n, (g, w) in enumerate(zip(steps, want[i][1])):
                if len(REQUESTS[i][0]) + n < same:  # the steps fed the same tokens
                    assert calc_diff(g, w) < 1e-3
    traffic = per_token([r["traffic"] for r in ranks])
    assert 2 <= traffic["rows"] <= 2 * min(4, world)  # each token once per rank it needs, both ways


def test_generate_command_under_torchrun(hf_checkpoint, tmp_path):  # noqa: F811
    """`torchrun -m dsv3.generate --parallel ep` with 3 prompts over 4 ranks (one without any) and
    4 redundant experts placed from the loads `dsv3.evaluate --expert-load` measured: rank 0 prints
    in prompt order the text one process prints, and the traffic per token."""
    from dsv3 import evaluate
    path, _ = hf_checkpoint()
    text, loads = tmp_path / "text.py", str(tmp_path / "loads.json")
    text.write_text("def f(x):\n    return x + 1\n\nimport os\nprint(os.getcwd())\n" * 8)
    assert evaluate.main(["--model", path, "--text", str(text), "--dtype", "float32", "--backend", "torch",
                          "--window", "64", "--expert-load", loads]) == 0
    args = ["--model", path, "--prompt", "def f(x):", "--prompt", "import os", "--prompt", "for i in range(10):",
            "--max-new-tokens", "6", "--dtype", "float32", "--backend", "torch"]
    one = subprocess.run([sys.executable, "-m", "dsv3.generate", *args], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    ep = _torchrun(4, "-m", "dsv3.generate", "--parallel", "ep", "--eplb", loads, "--redundant-experts", "4", *args)
    assert ep.stdout == one.stdout and one.stdout.count("--- prompt") == 3
    assert "expert parallel over 4 ranks (20 expert slots per MoE layer)" in ep.stderr


def test_shipped_model_with_mtp_decodes_without_speculation():
    """The shipped model has an MTP module: under `--parallel ep` it loads without it and decodes one
    token per step, the greedy text of one process's speculative decode (fp32); asking for
    `--speculative mtp` there is an error, not a hang."""
    args = ["--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", "8", "--dtype", "float32",
            "--backend", "torch"]
    one = subprocess.run([sys.executable, "-m", "dsv3.generate", *args], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0 and "MTP drafts accepted" in one.stderr, one.stderr[-2000:]
    ep = _torchrun(2, "-m", "dsv3.generate", "--parallel", "ep", *args)
    assert ep.stdout == one.stdout and "MTP drafts" not in ep.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dsv3.generate", "--parallel", "ep", "--speculative", "mtp", *args]
    bad = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--speculative 'mtp' is not supported with expert parallelism" in bad.stderr


@pytest.mark.parametrize("option", [["--fp8-dispatch"], ["--eplb", "loads.json"]])
def test_ep_options_need_ep(capsys, option):
    from dsv3.generate import main
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "x", *option])
    assert e.value.code == 2 and f"{option[0]} needs --parallel ep" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL path needs 2 GPUs")
def test_nccl_two_gpus(hf_checkpoint):  # noqa: F811
    """The same command on 2 GPUs (NCCL, the default backends) prints the text of one GPU process
    (float32: bf16 would round each rank's partial sum); FP8 dispatch runs."""
    path, _ = hf_checkpoint()
    args = ["--model", path, "--prompt", "def f(x):", "--prompt", "import os", "--max-new-tokens", "6",
            "--dtype", "float32"]
    one = subprocess.run([sys.executable, "-m", "dsv3.generate", *args], env=ENV, capture_output=True, text=True,
                         timeout=300)
    ep = _torchrun(2, "-m", "dsv3.generate", "--parallel", "ep", *args)
    assert one.returncode == 0 and ep.stdout == one.stdout
    _torchrun(2, "-m", "dsv3.generate", "--parallel", "ep", "--fp8-dispatch", *args)


def test_what_a_rank_holds():
    """Rank 1 of 4 in mode ep (no process group needed to build it): attention, dense MLP, shared
    expert, embedding and head whole; routed experts 4 of 16."""
    from dsv3.config import tiny
    from dsv3.model import Transformer
    par = Parallel("ep", rank=1, world=4)
    args = tiny(n_routed_experts=16, n_group=4, topk_group=2, vocab_size=255, num_attention_heads=3)
    model = Transformer(args, torch.float32, device="meta", parallel=par)  # 255 and 3 would not split over 4 with tp
    layer = model.model.layers[-1]
    assert layer.self_attn.num_heads == 3 and model.model.embed_tokens.weight.shape[0] == 255
    assert (layer.mlp.experts.lo, layer.mlp.experts.hi) == (4, 8) and layer.mlp.experts.w13.shape[0] == 4
    shared = layer.mlp.shared_experts.down_proj
    assert shared.in_features == args.moe_intermediate_size * args.n_shared_experts
    with pytest.raises(ValueError, match="n_routed_experts = 18 does not split over 4 expert-parallel ranks"):
        Transformer(tiny(n_routed_experts=18, n_group=6, topk_group=2), torch.float32, device="meta", parallel=par)


def test_eplb_places_replicas_of_the_heavy_experts():
    from dsv3 import eplb
    load = [0.35, 0.1, 0.1, 0.1, 0.1, 0.1, 0.075, 0.075]
    ranks = eplb.place(load, 4, 4)  # 12 slots, 3 per rank
    assert all(len(r) == 3 for r in ranks) and sorted({x for r in ranks for x in r}) == list(range(8))
    flat = [x for r in ranks for x in r]
    # 4 more replicas, each to the highest load per replica (0.35, 0.175, 0.117 > 0.1; then 0.1, the first)
    assert flat.count(0) == 4 and flat.count(1) == 2 and all(r.count(0) == 1 for r in ranks)
    per_rank = [sum(load[x] / flat.count(x) for x in r) for r in ranks]
    assert max(per_rank) - min(per_rank) <= 0.025 + 1e-9  # without replicas: 0.35 + ... on one rank
    assert max(sum(load[x] for x in r) for r in eplb.place(load, 4, 0)) >= 0.35
    with pytest.raises(ValueError, match="8 \\+ 1 must be a multiple of the 4 ranks"):
        eplb.place(load, 4, 1)
