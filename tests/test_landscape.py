"""amata-landscape (Figure 1 / 5): the loss surface and the projected PGD / Amata trajectories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amata_runner.cli.landscape import main
from amata_runner.control.landscape import (
    TrajectorySpec,
    amata_control,
    compute_landscape,
    trajectory_spec,
)
from amata_runner.errors import ConfigError
from conftest import FAST, amata_run

GRID = 9


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint amata-run wrote (one short epoch on the embedded digits)."""
    cwd = tmp_path_factory.mktemp("landscape_run")
    run_dir = cwd / "run"
    args = [*FAST, "epochs=1", "eval.final=false", "eval.subset=16", f"hydra.run.dir={run_dir}"]
    result = amata_run(args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return run_dir / "last.ckpt"


def test_cli_writes_png_and_npz_beside_the_checkpoint(checkpoint: Path) -> None:
    main(
        [
            f"ckpt={checkpoint}",
            "index=1",
            f"grid={GRID}",
            "trajectories=[pgd5,pgd2,amata]",
            "pca_from=pgd5",
        ]
    )
    png, npz = checkpoint.parent / "landscape_1.png", checkpoint.parent / "landscape_1.npz"
    assert png.is_file() and npz.is_file()
    from matplotlib.image import imread

    assert imread(png).ndim == 3  # a real image
    data = np.load(npz)  # no pickle needed
    assert data["loss"].shape == (GRID, GRID) and np.isfinite(data["loss"]).all()
    assert data["coords"].shape == (GRID,)
    assert list(data["names"]) == ["pgd5", "pgd2", "amata"]
    # Digits run: 1 epoch of 1 completed, Amata K 2 -> dataset.threat.steps (3 under FAST)
    steps = {"pgd5": 5, "pgd2": 2, "amata": int(data["steps_amata"])}
    assert steps["amata"] in (2, 3)
    for name, k in steps.items():
        assert data[f"traj_{name}"].shape == (k + 1, 2)  # x^0 .. x^K
        assert data[f"loss_{name}"].shape == (k + 1,)
        assert np.allclose(data[f"traj_{name}"][0], 0)  # each starts at x, the plane's origin
    # The centre of the grid is x itself: the surface there is the clean loss of every trajectory.
    centre = data["loss"][GRID // 2, GRID // 2]
    assert centre == pytest.approx(float(data["loss_pgd2"][0]), rel=1e-5)
    # Unit L-inf directions, orthogonal to each other.
    d1, d2 = data["dir1"].ravel(), data["dir2"].ravel()
    assert np.abs(d1).max() == pytest.approx(1) and np.abs(d2).max() == pytest.approx(1)
    assert abs(d1 @ d2) < 1e-9 * np.linalg.norm(d1) * np.linalg.norm(d2)
    assert data["traj_pgd5"][-1, 0] > 0  # oriented towards the attack


def test_cli_out_dir_and_several_examples(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    args = ["n_examples=2", "grid=5", "trajectories=[pgd3]", "pca_from=pgd3", "random_start=true"]
    main([f"ckpt={checkpoint.parent}", f"out={out}", *args])  # a run directory works too
    assert sorted(p.name for p in out.iterdir()) == [
        "landscape_0.npz",
        "landscape_0.png",
        "landscape_1.npz",
        "landscape_1.png",
    ]
    data = np.load(out / "landscape_0.npz")
    assert data["loss"].shape == (5, 5) and data["traj_pgd3"].shape == (4, 2)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["ckpt=/no/such/dir/last.ckpt"], "ckpt"),
        (["grid=1"], "grid"),
        (["trajectories=[fgsm]"], "trajectories"),
        (["index=100000"], "index"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], args: list[str], key: str
) -> None:
    argv = args if args[0].startswith("ckpt=") else [f"ckpt={checkpoint}", *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"amata-landscape: error: {key}=")


def test_amata_control_follows_the_linear_schedule_of_the_checkpoint_epoch() -> None:
    # Appendix C: K 2 -> 40, alpha = tau / K with tau = 0.01 * 40
    assert amata_control(0, 10, k_min=2, k_max=40, step_size=0.01, tau=None) == (
        2,
        pytest.approx(0.2),
    )
    k, alpha = amata_control(5, 10, k_min=2, k_max=40, step_size=0.01, tau=None)
    assert k == 21 and alpha == pytest.approx(0.4 / 21)
    # a finished run (epochs completed = T) uses the last epoch's K: 2 + 38 * 9 / 10 -> 36
    assert amata_control(10, 10, k_min=2, k_max=40, step_size=0.01, tau=None)[0] == 36
    with pytest.raises(ConfigError):
        amata_control(0, 10, k_min=5, k_max=2, step_size=0.01, tau=None)
    assert trajectory_spec("pgd40", step_size=0.01, amata=(7, 0.1)).label == "PGD-40"
    assert trajectory_spec("amata", step_size=0.01, amata=(7, 0.1)).steps == 7


def test_surface_is_the_loss_on_the_plane_through_x() -> None:
    """A linear model: the loss at every grid point matches a direct evaluation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(1, 1, 4, 4) * 0.5 + 0.25
    y = torch.tensor([1])
    pgd4 = TrajectorySpec("pgd4", "PGD-4", 4, 0.05)
    land = compute_landscape(model, x, y, [pgd4], pca_from=pgd4, eps=0.2, grid=5, span=0.3)
    d1 = torch.from_numpy(land.dir1).float()
    d2 = torch.from_numpy(land.dir2).float()
    for j, b in enumerate(land.coords):
        for i, a in enumerate(land.coords):
            point = (x + float(a) * d1 + float(b) * d2).clamp(0, 1)
            expected = nn.functional.cross_entropy(model(point), y).item()
            assert land.loss[j, i] == pytest.approx(expected, rel=1e-5)
    # The PCA axis carries the attack: the last PGD iterate projects mostly on d1.
    last = land.trajectories[0].points[-1]
    assert last[0] > 0 and abs(last[1]) < last[0]
