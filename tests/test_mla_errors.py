"""Bad input to the public MLA ops raises a clear Python error naming the argument."""

import pytest
import torch

import dsv3_kernels as dk

from builders import SCALE, make_cache


def _decode_args():
    return make_cache([70, 5], 64, torch.bfloat16, "cpu")


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(q=a["q"][..., :512].contiguous()), ValueError, "q must be"),
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :512].contiguous()), ValueError, "kv_cache must be"),
    (lambda a: a.update(q=a["q"].half()), TypeError, "kv_cache must have q's dtype"),
    (lambda a: a.update(q=a["q"].to(torch.float8_e4m3fn)), TypeError, "q must have dtype"),
    (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table must have dtype"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens must have dtype"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "batch size"),
    (lambda a: a.update(q=a["q"][:, :, ::2]), ValueError, "q must be contiguous"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :48].contiguous()), ValueError, "power of two"),
    (lambda a: a.update(softmax_scale=0.0), ValueError, "softmax_scale"),
    (lambda a: a.update(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda a: a.update(num_splits=-1), ValueError, "num_splits"),
    (lambda a: a["cache_seqlens"].__setitem__(1, 10**6), ValueError, r"cache_seqlens\[1\] = 1000000"),
    (lambda a: a["cache_seqlens"].__setitem__(0, -1), ValueError, r"cache_seqlens\[0\] = -1"),
    (lambda a: a["block_table"].__setitem__((0, 1), 999), ValueError, r"block_table\[0, 1\] = 999"),
    (lambda a: a["block_table"].__setitem__((1, 0), -5), ValueError, r"block_table\[1, 0\] = -5"),
])
def test_mla_decode_errors(change, error, match):
    q, kv_cache, block_table, seqlens = _decode_args()
    args = {"q": q, "kv_cache": kv_cache, "block_table": block_table, "cache_seqlens": seqlens,
            "softmax_scale": SCALE, "num_splits": 0}
    change(args)
    with pytest.raises(error, match=match):
        dk.mla_decode(**args)


def test_unread_block_table_entries_may_hold_anything():
    """Entries past a request's last block are padding: huge indices there are not an error."""
    q, kv_cache, block_table, seqlens = _decode_args()
    assert int(block_table[:, -1].min()) >= kv_cache.shape[0]
    out, lse = dk.mla_decode(q, kv_cache, block_table, seqlens, SCALE)
    assert not out.isnan().any() and not lse.isnan().any()


def test_mla_decode_mixed_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    q, kv_cache, block_table, seqlens = _decode_args()
    with pytest.raises(ValueError, match="one device"):
        dk.mla_decode(q.cuda(), kv_cache, block_table, seqlens, SCALE)


def _write_args():
    return {"kv_c": torch.randn(3, 512), "k_pe": torch.randn(3, 64), "kv_cache": torch.zeros(2, 16, 576),
            "slot_mapping": torch.tensor([0, 5, 31])}


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(kv_c=a["kv_c"][:, :500].contiguous()), ValueError, "kv_c"),
    (lambda a: a.update(k_pe=a["k_pe"][:2].contiguous()), ValueError, "k_pe"),
    (lambda a: a.update(k_pe=a["k_pe"].bfloat16()), TypeError, "k_pe must have dtype"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), TypeError, "slot_mapping must have dtype"),
    (lambda a: a["slot_mapping"].__setitem__(2, 32), ValueError, r"slot_mapping\[2\] = 32"),
    (lambda a: a.update(kv_norm_weight=torch.ones(256)), ValueError, "kv_norm_weight"),
    (lambda a: a.update(rope_cos=torch.ones(3, 32)), ValueError, "together"),
    (lambda a: a.update(rope_cos=torch.ones(3, 64), rope_sin=torch.ones(3, 64)), ValueError, "rope_cos must be"),
    (lambda a: a.update(rope_cos=torch.ones(3, 32).double(), rope_sin=torch.ones(3, 32)), TypeError, "rope_cos"),
])
def test_mla_cache_write_errors(change, error, match):
    args = _write_args()
    change(args)
    with pytest.raises(error, match=match):
        dk.mla_cache_write(**args)
