"""The paper losses against values worked out here, independently of stages.losses.

Every reference is computed in float64 with plain Python / numpy from the paper's definition
(explicit loops, np.corrcoef), never by calling the function under test with other arguments,
except where a property relates two calls (invariances, scaling).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.methods.losses import dist_loss, dkd_loss, kd_loss, logsum_loss, nd_loss  # the README's public import
from stages.methods.losses import flat_cosine_loss, joint_similarity_log_probs, similarity_kl, smoothed_soft_ce


def _t(x, grad=False):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


# -- DKD -------------------------------------------------------------------------------------


def _dkd_parts(s, t, target, temperature):
    """(TCKD, NCKD) batch means from the paper's definition, by loops over rows and classes."""
    tckd, nckd = [], []
    for zs, zt, y in zip(s, t, target):
        ps = _softmax([v / temperature for v in zs])
        pt = _softmax([v / temperature for v in zt])
        # 1 - p_y summed from the other classes: the same number, but exact when p_y rounds to 1
        others = [c for c in range(len(zs)) if c != y]
        ps_rest, pt_rest = sum(ps[c] for c in others), sum(pt[c] for c in others)
        tckd.append(_kl([pt[y], pt_rest], [ps[y], ps_rest]))
        # non-target distribution: renormalise the other classes' probabilities
        ps_hat = [ps[c] / ps_rest for c in others]
        pt_hat = [pt[c] / pt_rest for c in others]
        nckd.append(_kl(pt_hat, ps_hat))
    return sum(tckd) / len(tckd), sum(nckd) / len(nckd)


S23 = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
T23 = [[1.0, 1.5, 0.0], [-1.0, 2.0, 0.5]]
Y2 = [0, 2]


def test_dkd_two_by_three_by_hand():
    # row 0 at T = 1: p_s = softmax(2, .5, -1), p_t = softmax(1, 1.5, 0), target 0
    ps0, pt0 = _softmax(S23[0]), _softmax(T23[0])
    tckd0 = pt0[0] * math.log(pt0[0] / ps0[0]) + (1 - pt0[0]) * math.log((1 - pt0[0]) / (1 - ps0[0]))
    # non-target softmax over classes 1, 2 is softmax of those logits alone
    qs, qt = _softmax(S23[0][1:]), _softmax(T23[0][1:])
    nckd0 = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    ps1, pt1 = _softmax(S23[1]), _softmax(T23[1])
    tckd1 = pt1[2] * math.log(pt1[2] / ps1[2]) + (1 - pt1[2]) * math.log((1 - pt1[2]) / (1 - ps1[2]))
    qs, qt = _softmax(S23[1][:2]), _softmax(T23[1][:2])
    nckd1 = sum(a * math.log(a / b) for a, b in zip(qt, qs))
    expected = 1.5 * (tckd0 + tckd1) / 2 + 0.5 * (nckd0 + nckd1) / 2
    got = dkd_loss(_t(S23), _t(T23), torch.tensor(Y2), alpha=1.5, beta=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_dkd_defaults_are_alpha_1_beta_2_t_1():
    tckd, nckd = _dkd_parts(S23, T23, Y2, 1.0)
    assert dkd_loss(_t(S23), _t(T23), torch.tensor(Y2)).item() == pytest.approx(tckd + 2 * nckd, rel=1e-12)


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (0.7, 8.0, 4.0), (2.0, 1.0, 0.5)])
def test_dkd_is_alpha_tckd_plus_beta_nckd_times_t_squared(alpha, beta, temperature):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 7)) * 3, rng.normal(size=(6, 7)) * 3
    target = rng.integers(0, 7, size=6)
    tckd, nckd = _dkd_parts(s.tolist(), t.tolist(), target.tolist(), temperature)
    expected = temperature**2 * (alpha * tckd + beta * nckd)
    got = dkd_loss(_t(s), _t(t), torch.from_numpy(target), alpha=alpha, beta=beta, temperature=temperature)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_dkd_temperature_scales_by_t_squared():
    rng = np.random.default_rng(1)
    s, t = _t(rng.normal(size=(5, 4))), _t(rng.normal(size=(5, 4)))
    y = torch.tensor([0, 1, 2, 3, 0])
    for temperature in (2.0, 4.0):
        at_t = dkd_loss(s, t, y, temperature=temperature)
        pre_scaled = dkd_loss(s / temperature, t / temperature, y, temperature=1.0)
        assert at_t.item() == pytest.approx(temperature**2 * pre_scaled.item(), rel=1e-12)


def test_dkd_recovers_kd_with_the_papers_decomposition():
    # The paper's Eq. (KD = TCKD + (1 - p_t^T) NCKD): for one sample, beta = 1 - p_t^T gives KD exactly.
    s, t, y = _t([[0.3, -1.2, 2.0, 0.1]]), _t([[1.0, 0.2, 2.5, -0.3]]), torch.tensor([2])
    p_target = _softmax(t[0].tolist())[2]
    assert dkd_loss(s, t, y, alpha=1.0, beta=1 - p_target).item() == pytest.approx(kd_loss(s, t).item(), rel=1e-12)


def test_dkd_is_zero_and_has_finite_gradients_when_student_equals_teacher():
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    s = z.clone().requires_grad_()
    loss = dkd_loss(s, z, torch.arange(8) % 10, temperature=4.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-5


def test_dkd_stays_finite_and_exact_for_saturated_logits():
    # In float32 softmax(100, 0, 0) rounds p_target to 1, so log(1 - p_target) taken naively is -inf.
    s = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, -90.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([0, 2])
    loss = dkd_loss(s, t, y)
    loss.backward()
    tckd, nckd = _dkd_parts(s.tolist(), t.tolist(), y.tolist(), 1.0)
    assert loss.item() == pytest.approx(tckd + 2 * nckd, rel=1e-5)
    assert torch.isfinite(s.grad).all()


def test_dkd_treats_a_teacher_probability_of_zero_as_contributing_nothing():
    # A masked teacher logit (-inf) is p = 0: 0 log 0 = 0, with finite student gradients.
    s = torch.tensor([[0.5, 1.0, -0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, float("-inf"), 0.0, 0.5]], dtype=torch.float64)
    loss = dkd_loss(s, t, torch.tensor([0]))
    loss.backward()
    tckd, nckd = _dkd_parts(s.tolist(), t.tolist(), [0], 1.0)
    assert loss.item() == pytest.approx(tckd + 2 * nckd, rel=1e-12)
    assert torch.isfinite(s.grad).all()


# -- DIST ------------------------------------------------------------------------------------


def _np_softmax(z, tau):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / tau)
    return e / e.sum(axis=1, keepdims=True)


def _dist_reference(s, t, beta, gamma, tau):
    ps, pt = _np_softmax(s, tau), _np_softmax(t, tau)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(ps.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(ps.shape[1])])
    return tau**2 * (beta * inter + gamma * intra)


def test_dist_two_by_three_by_hand():
    ps = np.array([_softmax(r) for r in S23])
    pt = np.array([_softmax(r) for r in T23])

    def pearson(a, b, eps):  # the textbook formula by loops; the official code adds eps to the norm product
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)) + eps)

    def loss(eps):
        inter = 1 - (pearson(ps[0], pt[0], eps) + pearson(ps[1], pt[1], eps)) / 2
        # with B = 2 each column correlation is +-1: the sign of the change between the two samples
        intra = 1 - sum(pearson(ps[:, c], pt[:, c], eps) for c in range(3)) / 3
        return inter + intra

    got = dist_loss(_t(S23), _t(T23)).item()
    assert got == pytest.approx(loss(1e-8), rel=1e-12)  # the official eps, exactly
    assert got == pytest.approx(loss(0.0), abs=1e-6)  # and the paper's Pearson, up to that eps


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (0.5, 3.0, 2.0), (2.0, 0.0, 4.0), (0.0, 1.0, 1.0)])
def test_dist_is_tau_squared_times_weighted_inter_plus_intra(beta, gamma, tau):
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
    got = dist_loss(_t(s), _t(t), beta=beta, gamma=gamma, tau=tau)
    assert got.item() == pytest.approx(_dist_reference(s, t, beta, gamma, tau), abs=1e-6)


def test_dist_is_zero_with_finite_gradients_when_student_equals_teacher():
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(3)) * 2
    s = z.clone().requires_grad_()
    loss = dist_loss(s, z, tau=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-4)  # eps = 1e-8 on the norm product leaves ~1e-6
    assert torch.isfinite(s.grad).all()


def test_dist_is_invariant_to_a_per_row_constant_on_the_logits():
    rng = np.random.default_rng(4)
    s, t = _t(rng.normal(size=(5, 6))), _t(rng.normal(size=(5, 6)))
    shift_s, shift_t = _t(rng.normal(size=(5, 1)) * 10), _t(rng.normal(size=(5, 1)) * 10)
    assert dist_loss(s + shift_s, t + shift_t, tau=2.0).item() == pytest.approx(
        dist_loss(s, t, tau=2.0).item(), abs=1e-10
    )


def test_dist_counts_a_constant_column_as_uncorrelated():
    # One sample: every class column is constant across the batch, Pearson is 0/0; the official
    # eps makes it 0, so intra = 1 while inter = 0 for identical inputs.
    z = _t([[0.5, 1.0, -2.0]])
    assert dist_loss(z, z, beta=1.0, gamma=1.0).item() == pytest.approx(1.0, abs=1e-6)


# -- KD++ norm and direction -----------------------------------------------------------------


def test_nd_two_samples_by_hand():
    class_means = _t([[3.0, 4.0], [0.0, 2.0], [10.0, 0.0]])  # unit directions (.6, .8), (0, 1), (1, 0)
    s = _t([[1.0, 1.0], [2.0, 0.0]])
    t_norm = _t([2.0, 1.0])
    target = torch.tensor([0, 1])
    # sample 0: <s, e> = .6 + .8 = 1.4, max(sqrt 2, 2) = 2 -> 1 - .7
    # sample 1: <s, e> = 0, max(2, 1) = 2            -> 1 - 0
    expected = ((1 - 1.4 / 2) + (1 - 0.0)) / 2
    assert nd_loss(s, t_norm, class_means, target).item() == pytest.approx(expected, rel=1e-12)


def test_nd_is_zero_when_aligned_with_the_class_mean_and_at_least_the_teacher_norm():
    rng = np.random.default_rng(5)
    means = rng.normal(size=(4, 8))
    target = np.array([0, 3, 1, 3, 2])
    e = means[target] / np.linalg.norm(means[target], axis=1, keepdims=True)
    t_norm = rng.uniform(1, 5, size=5)
    scale = t_norm * np.array([1.0, 1.5, 3.0, 1.0, 2.0])  # >= t_norm
    s = _t(e * scale[:, None], grad=True)
    loss = nd_loss(s, _t(t_norm), _t(means), torch.from_numpy(target))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-12


def test_nd_aligned_but_shorter_than_the_teacher_is_one_minus_the_norm_ratio():
    means = _t([[0.0, 0.0, 5.0]])
    s = _t([[0.0, 0.0, 1.5]])
    assert nd_loss(s, _t([6.0]), means, torch.tensor([0])).item() == pytest.approx(1 - 1.5 / 6.0, rel=1e-12)


def test_nd_is_unchanged_by_class_mean_length_and_by_scaling_student_and_teacher_together():
    rng = np.random.default_rng(6)
    s, t_norm, means = rng.normal(size=(6, 5)), rng.uniform(0.5, 3, size=6), rng.normal(size=(3, 5))
    target = torch.from_numpy(rng.integers(0, 3, size=6))
    base = nd_loss(_t(s), _t(t_norm), _t(means), target).item()
    lengths = rng.uniform(0.1, 10, size=(3, 1))
    assert nd_loss(_t(s), _t(t_norm), _t(means * lengths), target).item() == pytest.approx(base, rel=1e-12)
    assert nd_loss(_t(7 * s), _t(7 * t_norm), _t(means), target).item() == pytest.approx(base, rel=1e-12)


def test_nd_on_a_norm_tie_uses_the_students_norm_as_the_official_code_does():
    # ||s|| = 5 = t_norm and s points along e: through the student's norm the gradient is 0;
    # through the teacher's (a constant) it would be -e / 5.
    s = _t([[3.0, 4.0]], grad=True)
    loss = nd_loss(s, _t([5.0]), _t([[6.0, 8.0]]), torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    assert s.grad.abs().max().item() < 1e-15


def test_nd_gradient_matches_the_closed_form():
    # ||s|| > t_norm: d/ds (1 - <s,e>/||s||) = -(e/||s|| - <s,e> s/||s||^3); ||s|| < t_norm: -e/t_norm
    s = _t([[1.0, 2.0], [0.1, -0.2]], grad=True)
    t_norm = _t([1.0, 4.0])
    means = _t([[1.0, 0.0], [0.0, 1.0]])
    nd_loss(s, t_norm, means, torch.tensor([1, 0])).backward()
    n0 = math.sqrt(5.0)
    g0 = [-(0.0 / n0 - 2.0 * 1.0 / n0**3), -(1.0 / n0 - 2.0 * 2.0 / n0**3)]
    g1 = [-1.0 / 4.0, 0.0]
    np.testing.assert_allclose(s.grad.numpy(), np.array([g0, g1]) / 2, rtol=1e-12, atol=1e-15)


# -- LogSum ----------------------------------------------------------------------------------


NS = [[1.0, -1.0], [0.25, 0.5]]
NT = [[0.0, 1.0], [0.25, 0.0]]  # differences [[1, -2], [0, .5]]


def test_logsum_by_hand():
    assert logsum_loss(_t(NS), _t(NT)).item() == pytest.approx(math.log(1 + 16 + 0 + 0.0625), rel=1e-12)


def test_logsum_respects_the_exponent():
    assert logsum_loss(_t(NS), _t(NT), exponent=2.0).item() == pytest.approx(math.log(1 + 4 + 0 + 0.25), rel=1e-12)
    assert logsum_loss(_t(NS), _t(NT), exponent=1.0).item() == pytest.approx(math.log(3.5), rel=1e-12)


def test_logsum_sums_over_batch_and_dim_without_averaging():
    rng = np.random.default_rng(7)
    ns, nt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    expected = math.log(sum(abs(a - b) ** 4 for ra, rb in zip(ns, nt) for a, b in zip(ra, rb)))
    assert logsum_loss(_t(ns), _t(nt)).item() == pytest.approx(expected, rel=1e-12)
    # twice the rows, twice the sum: log grows by log 2 (a mean would not change)
    doubled = logsum_loss(_t(np.vstack([ns, ns])), _t(np.vstack([nt, nt]))).item()
    assert doubled == pytest.approx(expected + math.log(2), rel=1e-12)


def test_logsum_is_minus_infinity_for_identical_inputs_by_definition():
    z = _t(NS)
    assert logsum_loss(z, z.clone()).item() == -math.inf


def test_logsum_near_identical_inputs_give_finite_values_and_gradients():
    ns = torch.randn(4, 2, generator=torch.Generator().manual_seed(8))
    nt = ns + 1e-3
    ns.requires_grad_()
    loss = logsum_loss(ns, nt)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(8 * 1e-12), rel=1e-3)
    assert torch.isfinite(ns.grad).all()


def test_logsum_gradient_matches_the_closed_form():
    # d/dns log S = p |d|^(p-1) sign(d) / S
    ns = _t(NS, grad=True)
    logsum_loss(ns, _t(NT), exponent=3.0).backward()
    d = np.array(NS) - np.array(NT)
    total = np.sum(np.abs(d) ** 3)
    np.testing.assert_allclose(ns.grad.numpy(), 3 * np.abs(d) ** 2 * np.sign(d) / total, rtol=1e-12)


# -- KD (unchanged; checked here by hand alongside the others) --------------------------------


def test_kd_two_by_three_by_hand():
    temperature = 2.0
    expected = (
        sum(
            _kl(_softmax([v / temperature for v in zt]), _softmax([v / temperature for v in zs]))
            for zs, zt in zip(S23, T23)
        )
        / 2
        * temperature**2
    )
    assert kd_loss(_t(S23), _t(T23), temperature=temperature).item() == pytest.approx(expected, rel=1e-12)


# -- CosPress: the similarity-preserving KL and the flattened cosine -----------------------------


def _joint(vectors, temperature):
    """t-SNE's symmetric joint p_ij from cosines, by loops: p(j|i) over j != i, p_ij = (p(j|i) + p(i|j)) / 2N."""
    n = len(vectors)
    unit = [np.asarray(v, float) / np.linalg.norm(v) for v in vectors]
    cond = [[0.0] * n for _ in range(n)]
    for i in range(n):
        e = {j: math.exp(float(unit[i] @ unit[j]) / temperature) for j in range(n) if j != i}
        for j, v in e.items():
            cond[i][j] = v / sum(e.values())
    return [[(cond[i][j] + cond[j][i]) / (2 * n) for j in range(n)] for i in range(n)]


def _sim_kl(teacher_sets, mapped_sets, temperatures):
    total = 0.0
    for t in temperatures:
        per_set = []
        for a, b in zip(teacher_sets, mapped_sets):
            p, q = _joint(a, t), _joint(b, t)
            per_set.append(
                sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(len(a)) for j in range(len(a)) if i != j)
            )
        total += sum(per_set) / len(per_set)
    return total / len(temperatures)


def test_similarity_kl_three_vectors_by_hand():
    # Teacher: three directions at 0, 90 and 180 degrees (cosines 0, -1, 0). Mapped: all three the same
    # direction (cosines 1), so q is uniform over the six ordered pairs: q_ij = 1/6.
    teacher = _t([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    mapped = _t([[[2.0], [1.0], [3.0]]])
    a = 1 / (1 + math.exp(-1))  # p(2|1) = p(2|3) at temperature 1; p(1|2) = p(3|2) = 1/2
    p12, p13 = (a + 0.5) / 6, 2 * (1 - a) / 6  # p23 = p12
    expected = 2 * (2 * p12 * math.log(6 * p12) + p13 * math.log(6 * p13))
    assert similarity_kl(teacher, mapped, [1.0]).item() == pytest.approx(expected, rel=1e-6)


def test_similarity_kl_is_the_loop_reference_at_every_temperature_and_averages_them():
    rng = np.random.default_rng(10)
    teacher, mapped = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 3))
    temperatures = [0.05, 0.1, 0.5]
    got = similarity_kl(_t(teacher), _t(mapped), temperatures).item()
    assert got == pytest.approx(_sim_kl(teacher, mapped, temperatures), rel=1e-5)
    each = [similarity_kl(_t(teacher), _t(mapped), [t]).item() for t in temperatures]
    assert got == pytest.approx(sum(each) / 3, rel=1e-6)


def test_similarity_kl_is_zero_when_the_mapping_preserves_every_cosine():
    # Teacher tokens span 3 of 8 dimensions: their coordinates in that subspace, rescaled per token,
    # keep every cosine in 3 dimensions.
    g = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))  # (8, 3) orthonormal columns
    coords = torch.randn(4, 7, 3, generator=g, dtype=torch.float64)
    teacher = coords @ basis.T  # (4, 7, 8)
    mapped = coords * torch.rand(4, 7, 1, generator=g, dtype=torch.float64).add(0.5)
    assert similarity_kl(teacher, mapped, [0.01, 0.05, 0.1]).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_kl(teacher, coords @ torch.randn(3, 3, generator=g, dtype=torch.float64), [0.05]).item() > 1e-3


def test_similarity_terms_stay_finite_with_masked_self_pairs():
    # At temperature 0.01 with identical and nearly identical vectors; the self-pairs have p = 0 exactly.
    x = torch.ones(2, 4, 5, dtype=torch.float32)
    x[1, 1:] += 1e-4 * torch.arange(3 * 5, dtype=torch.float32).view(3, 5)
    log_p = joint_similarity_log_probs(x, 0.01)
    assert torch.isfinite(log_p).all()
    assert torch.equal(log_p.exp().diagonal(dim1=-2, dim2=-1), torch.zeros(2, 4))
    assert log_p.exp().sum(dim=(-2, -1)).sub(1).abs().max() < 1e-5
    mapped = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(12)).requires_grad_()
    loss = similarity_kl(x, mapped, [0.01, 0.1])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(mapped.grad).all()


def test_flat_cosine_is_one_cosine_over_all_tokens_of_an_image():
    s = _t([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, T=2, D=2)
    t = _t([[[3.0, 0.0], [0.0, 1.0]]])
    # Flattened: (1, 0, 0, 1) . (3, 0, 0, 1) / (sqrt 2 sqrt 10); token by token both cosines are 1.
    assert flat_cosine_loss(s, t).item() == pytest.approx(1 - 4 / math.sqrt(20), rel=1e-12)
    assert flat_cosine_loss(_t([[1.0, 2.0], [0.0, 1.0]]), _t([[2.0, 4.0], [0.0, -3.0]])).item() == pytest.approx(
        (0 + 2) / 2
    )


# -- GPD's SCE ----------------------------------------------------------------------------------


def test_smoothed_soft_ce_by_hand():
    # softmax(0, ln 2) = (1/3, 2/3); target (1/4, 3/4)
    ce = -(0.25 * math.log(1 / 3) + 0.75 * math.log(2 / 3))
    uniform = -(math.log(1 / 3) + math.log(2 / 3)) / 2
    got = smoothed_soft_ce(_t([[0.0, math.log(2)]]), _t([[0.25, 0.75]]))
    assert got.item() == pytest.approx(0.9 * ce + 0.1 * uniform, rel=1e-12)
    assert smoothed_soft_ce(_t([[0.0, math.log(2)]]), _t([[0.25, 0.75]]), smoothing=0.0).item() == pytest.approx(
        ce, rel=1e-12
    )


def test_similarity_kl_is_computed_in_float32_under_autocast():
    g = torch.Generator().manual_seed(13)
    teacher, mapped = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = similarity_kl(teacher, mapped, [0.01, 0.1])
    assert under.dtype == torch.float32
    assert under.item() == pytest.approx(similarity_kl(teacher, mapped, [0.01, 0.1]).item(), rel=1e-6)
