"""How teacher outputs become store rows and come back: top-k reconstruction, dtypes, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_record
from stages.cache import teacher_rows
from stages.cache import topk
from storage import Store, TeacherRecord, UnitArrays, UserError


def _info(
    logits="topk", k=3, dtype="float32", num_classes=10, feature_dim=6, outputs=("logits", "features")
) -> TeacherRecord:
    return make_record(
        outputs=outputs,
        num_classes=num_classes,
        feature_dim=feature_dim,
        logits=logits,
        k=k,
        dtype=dtype,
        feature_dtype=dtype,
    )


def _outputs(batch=8, num_classes=10, feature_dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "logits": 3 * torch.randn(batch, num_classes, generator=g),
        "features": torch.randn(batch, feature_dim, generator=g),
    }


LABELS = torch.arange(8) % 10


def test_topk_reconstruction_keeps_the_teacher_probabilities():
    out = _outputs()
    info = _info(k=3)
    rows = teacher_rows.encode(out, LABELS, info)
    index = torch.from_numpy(rows["topk_index"][:, :3]).long()  # the top k (the last slot is the target class)
    full = topk.logits_from_topk(rows, info.num_classes)
    assert full.shape == (8, 10) and full.dtype == torch.float32
    p_teacher, p_full = out["logits"].softmax(1), full.softmax(1)
    # At T=1 the top-k probabilities are the teacher's.
    torch.testing.assert_close(p_full.gather(1, index), p_teacher.gather(1, index), rtol=0, atol=1e-6)
    # The row's normaliser is the stored one, which is the teacher's exact log-sum-exp.
    torch.testing.assert_close(torch.logsumexp(full, 1), torch.from_numpy(rows["logsumexp"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.from_numpy(rows["logsumexp"]), torch.logsumexp(out["logits"], 1), rtol=0, atol=1e-6
    )
    # The target class keeps its own probability; the rest of the mass is spread evenly over the other classes.
    kept = torch.zeros(8, 10, dtype=torch.bool).scatter_(1, index, True)
    kept[torch.arange(8), LABELS] = True
    torch.testing.assert_close(p_full[torch.arange(8), LABELS], p_teacher[torch.arange(8), LABELS], rtol=0, atol=1e-6)
    rest = p_full.masked_fill(kept, 0.0)
    expected = (1 - p_teacher.masked_fill(~kept, 0.0).sum(1, keepdim=True)) / (~kept).sum(1, keepdim=True)
    torch.testing.assert_close(rest, expected.expand(-1, 10).masked_fill(kept, 0.0), rtol=0, atol=1e-6)
    # The top-k classes stay the top-k classes.
    assert torch.equal(full.topk(3, 1).indices.sort(1).values, index.sort(1).values)


def test_topk_with_k_equal_to_classes_gives_the_logits_back():
    out = _outputs()
    rows = teacher_rows.encode(out, LABELS, _info(k=10))
    full = topk.logits_from_topk(rows, 10)
    # log-probability + log-sum-exp, each float32: the logits to float32 rounding.
    torch.testing.assert_close(full, out["logits"], rtol=0, atol=2e-6)


def test_target_log_probability_is_the_true_class_one():
    out = _outputs()
    rows = teacher_rows.encode(out, LABELS, _info(k=3))
    np.testing.assert_array_equal(rows["topk_index"][:, -1], LABELS.numpy())  # the top k, then the target class
    expected = torch.log_softmax(out["logits"].double(), 1)[torch.arange(8), LABELS].float().numpy()
    np.testing.assert_allclose(rows["topk_logp"][:, -1], expected, rtol=1e-6)
    assert rows["topk_logp"].shape == rows["topk_index"].shape == (8, 4) and rows["tail"].shape == (8, 2)


def _through_store(tmp_path, rows, info):
    """Write encoded rows as one unit of a real zarr group and read them back."""
    group = UnitArrays.create(tmp_path / "t", teacher_rows.array_specs(info), num_views=1, num_samples=8, block=8)
    group.write_unit(0, 0, rows)
    assert group.committed() == {(0, 0)}
    return group.read_unit(0, 0)


def test_full_float32_round_trip_through_the_store_is_exact(tmp_path):
    out, info = _outputs(), _info(logits="full", dtype="float32")
    assert set(teacher_rows.array_specs(info)) == {"logits", "features"}
    rows = _through_store(tmp_path, teacher_rows.encode(out, LABELS, info), info)
    back = teacher_rows.decode(rows, info, ("logits", "features"))
    assert torch.equal(back["logits"], out["logits"])
    assert torch.equal(back["features"], out["features"])


def test_topk_float16_round_trip_through_the_store_is_close(tmp_path):
    out, info = _outputs(), _info(logits="topk", k=3, dtype="float16")
    rows = _through_store(tmp_path, teacher_rows.encode(out, LABELS, info), info)
    assert rows["topk_logp"].dtype == np.float16 and rows["topk_index"].dtype == np.int16
    assert rows["tail"].dtype == np.float16
    assert rows["logsumexp"].dtype == np.float32 and rows["features"].dtype == np.float16
    back = teacher_rows.decode(
        {k: rows[k] for k in teacher_rows.stored_names(info, ("logits", "features"))}, info, ("logits", "features")
    )
    assert back["logits"].dtype == torch.float32 and back["features"].dtype == torch.float32
    index = torch.from_numpy(rows["topk_index"]).long()  # the top 3 and the target: all kept
    torch.testing.assert_close(
        back["logits"].softmax(1).gather(1, index), out["logits"].softmax(1).gather(1, index), rtol=0, atol=2e-3
    )
    assert torch.equal(back["logits"].argmax(1), out["logits"].argmax(1))
    torch.testing.assert_close(back["features"], out["features"], rtol=1e-3, atol=1e-3)


def test_stored_names_read_only_what_is_needed():
    assert teacher_rows.stored_names(_info(logits="topk"), ("logits",)) == list(topk.ARRAYS)
    assert teacher_rows.stored_names(_info(logits="full"), ("logits", "features")) == ["logits", "features"]
    with pytest.raises(UserError, match="has no features .* --outputs logits,features"):
        teacher_rows.stored_names(_info(outputs=("logits",)), ("features",))


def test_class_index_dtype_grows_with_the_class_count():
    assert teacher_rows.array_specs(_info(num_classes=1000))["topk_index"].dtype == "int16"
    assert teacher_rows.array_specs(_info(num_classes=40000))["topk_index"].dtype == "int32"


def test_output_info_validates_settings(teacher1):
    fields = teacher_rows.output_info(teacher1, k=50)  # TeacherRecord fields
    assert fields["k"] == 10  # never more than the classes
    assert fields["outputs"] == ["logits", "features"] and fields["num_classes"] == 10 and fields["feature_dim"] == 512
    assert fields["feature_dtype"] == "float16" and "num_tokens" not in fields  # tokens only when asked for
    for bad in (
        dict(logits="some"),
        dict(dtype="bfloat16"),
        dict(feature_dtype="int4"),
        dict(k=0),
        dict(outputs=("attention",)),
    ):
        with pytest.raises(UserError):
            teacher_rows.output_info(teacher1, **bad)


def test_cached_rows_equal_the_live_teacher(base_store, train_data, plan, teacher1):
    """Block 1 of view 0 from the shared store, against the teacher run on the same views now."""
    from stages.cache.store_setup import stored_plan
    from stages.data.replay import StoredViews
    from stages.data.views import normalize, row

    store = Store(base_store)
    views = StoredViews(store, stored_plan(store))
    params = views.params(0, 1)
    ids = views.ids(1)
    images = torch.stack([plan.render(train_data.image(int(i)), row(params, j), 32) for j, i in enumerate(ids)])
    live = teacher1(normalize(images, teacher1.mean, teacher1.std))
    info = store.teacher_info("t1")
    stored = teacher_rows.decode(store.teacher("t1").read_unit(0, 1), info, ("logits", "features"))
    assert torch.equal(stored["logits"], live["logits"])
    assert torch.equal(stored["features"], live["features"])
