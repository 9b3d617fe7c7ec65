"""The exactness rule anchors, replay and verify share (mlx_k2/evidence/platforms.py): which computations
must give the same bits, and what an anchor comparison says on each side of it."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_k2.evidence.anchors import Anchor, compare, find_anchor, reproduced
from mlx_k2.evidence.platforms import same_bits

X86 = {"backend": "mlx", "device": "cpu", "compute_dtype": "float32", "kernels": "mlx_k2-cpu/9:avx2",
       "machine": "x86_64", "system": "Linux"}
ARM = {**X86, "kernels": "mlx_k2-cpu/9:neon", "machine": "arm64", "system": "Darwin"}
VALUES = {"token_id": 7, "logit": 12.5, "hidden_digest": "aa", "logits_digest": "bb", "bytes_read": 1000}


def test_portable_computations_give_the_same_bits_on_any_machine():
    ok, rule = same_bits({**X86, "exactness": "portable"}, {**ARM, "exactness": "portable"})
    assert ok and rule.startswith("portable")


def test_platform_computations_give_the_same_bits_only_on_their_machine():
    assert not same_bits({**X86, "exactness": "platform"}, {**ARM, "exactness": "platform"})[0]
    assert same_bits({**X86, "exactness": "platform"}, {**X86, "kernels": "mlx_k2-cpu/9:scalar",
                                                        "exactness": "platform"}) == (True, "platform: same x86_64 Linux")
    # a portable recording replayed by a platform computation (another build's kernels) promises nothing
    assert not same_bits({**X86, "exactness": "portable"}, {**ARM, "exactness": "platform"})[0]


def test_other_kernels_or_device_never_give_the_same_bits():
    for change in ({"kernels": "mlx_k2-cpu/8:avx2"}, {"device": "gpu"}, {"compute_dtype": "bfloat16"}):
        assert not same_bits({**X86, "exactness": "portable"}, {**X86, **change, "exactness": "portable"})[0]


def test_a_record_without_the_machine_is_taken_at_its_word():
    old = {k: v for k, v in X86.items() if k not in ("machine", "system")}
    ok, rule = same_bits(old, {**ARM, "kernels": X86["kernels"], "exactness": "platform"})
    assert ok and "not recorded" in rule


def _anchor(tmp_path: Path, exactness: str) -> Anchor:
    data = {"name": "a", "kind": "frozen", "checkpoint": {"config_blake3": "c"}, "prompt_ids": [1],
            **X86, "kernels": "mlx_k2-cpu/9", "exactness": exactness, "expected": VALUES}
    path = tmp_path / f"{exactness}.json"
    path.write_text(json.dumps(data))
    return Anchor(path, data)


def test_an_anchor_is_reproduced_where_it_must_be_and_agreed_with_elsewhere(tmp_path):
    portable, platform = _anchor(tmp_path, "portable"), _anchor(tmp_path, "platform")
    close = {**VALUES, "logit": 12.5004, "hidden_digest": "other", "logits_digest": "other"}
    rows = compare(portable, VALUES, {**ARM, "exactness": "portable"})
    assert reproduced(rows)
    rows = compare(platform, close, {**ARM, "exactness": "platform"})
    assert all(r.ok is not False for r in rows) and not reproduced(rows)
    assert {r.field for r in rows if r.ok is None} == {"hidden_digest", "logits_digest"}
    far = compare(platform, {**close, "logit": 12.6}, {**ARM, "exactness": "platform"})
    assert [r.field for r in far if r.ok is False] == ["logit"]
    # the same values on the anchor's own machine must be bit for bit: other digests fail there
    assert {r.field for r in compare(platform, close, {**X86, "exactness": "platform"}) if r.ok is False} == \
        {"logit", "hidden_digest", "logits_digest"}


def test_find_anchor_prefers_the_one_this_platform_must_reproduce(tmp_path):
    portable, platform = _anchor(tmp_path, "portable"), _anchor(tmp_path, "platform")
    found = find_anchor([platform, portable], {"config_blake3": "c"}, {}, [1], {**ARM, "exactness": "portable"})
    assert found is portable
