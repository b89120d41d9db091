import numpy as np
import torch

from clcluster.align import PolarCache, PolarGrid, align_all, hard_em, polar_transform, to_reference_frame
from clcluster.imageops import fourier_shift, rotate
from clcluster.metrics import hungarian_accuracy


def test_pose_is_recovered_and_undone():
    ref = np.zeros((1, 32, 32), np.float32)
    ref[0, 10:14, 16:24] = 1
    ref[0, 16:20, 12:15] = 2
    img = fourier_shift(rotate(ref, [37.0]), [[1.0, -1.0]])
    pg = PolarGrid(32, max_shift=2)
    refp = polar_transform(torch.from_numpy(ref), pg)[:, int(np.argmin(np.abs(pg.offsets).sum(1)))]
    res, _, _ = align_all(PolarCache(img, pg), refp)
    assert abs(res.angle_deg[0] - 37.0) <= 360 / 64
    assert np.allclose(res.shift_px[0], [1.0, -1.0])
    back = to_reference_frame(img, res.angle_deg, res.shift_px)
    assert np.corrcoef(back.ravel(), ref.ravel())[0, 1] > 0.9


def test_hard_em_recovers_views_on_easy_data(easy_sim, preprocessed_easy):
    cfg, sim = easy_sim
    cache = PolarCache(preprocessed_easy, PolarGrid(32, max_shift=2))
    best = max((hard_em(cache, np.random.default_rng(r).integers(0, 4, len(preprocessed_easy)), 4, seed=r)
                for r in range(3)), key=lambda r: r.objective)
    assert hungarian_accuracy(sim.truth["class"], best.alignment.labels) >= 0.9
